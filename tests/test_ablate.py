"""bench/ablate.py on a tiny grid: tables and plot, checkpoints reused for inference-only constants, finished
runs skipped, interrupted runs continued, a time budget, seeds (mean and spread), the tuned peer chosen on
val, and a clear error for a bad name."""
import argparse
import csv
import math
from pathlib import Path

import pytest

from bench import ablate
import engine
import infer
from bench import peer
import predict
import train
from bench.realistic_data import make_realistic_data
from conftest import tiny_args
from utils import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

SHARED = dict(NUM_WORKERS=0, VAL_FRACTION=0.34, WARMUP_ITERS=1, VAL_DETECTIONS_PER_IMAGE=50)


@pytest.fixture(autouse=True)
def few_detections(monkeypatch):
    """Scoring keeps 50 detections an image (infer.py's constant, read by ablate): an untrained model's 1000
    would cost the mask head minutes on a 2-core CPU, and the tables' logic is the same."""
    monkeypatch.setattr(infer, "DETECTIONS_PER_IMAGE", 50)


@pytest.fixture(scope="module")
def real_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic") / "d"
    make_realistic_data(out, seed=3, test_fraction=0.34, images=6, max_side=96)
    return out


def test_ablate_tiny_grid_tables_reuse_resume_and_skip(real_small, tmp_path, monkeypatch):
    out = tmp_path / "abl"
    # an interrupted run: 'losses=stock' stopped after epoch 1 of 2
    train.main(tiny_args(DATA_DIR=str(real_small), RUN_DIR=str(out / "losses=stock"), EPOCHS=1, LOSSES="stock",
                         **SHARED))
    first_epoch = load_checkpoint(out / "losses=stock" / "last.pt")["state"]["history"][0]
    calls = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or real_main(argv))
    thresholds, real_to_records = [], predict.to_records
    spy = lambda raw, t: thresholds.append(t) or real_to_records(raw, t)  # noqa: E731
    monkeypatch.setattr(ablate, "to_records", spy)  # scoring the test images
    monkeypatch.setattr(engine, "to_records", spy)  # validation during training
    argv = ["--data-dir", str(real_small), "--out", str(out), "--vary", "losses=stock,report",
            "--vary", "mask-threshold=0.5,0.6", "--"] + tiny_args(EPOCHS=2, **SHARED)
    rows = ablate.main(argv)
    assert len(calls) == 2  # one training per loss preset; the mask thresholds reuse its checkpoint
    resumed = load_checkpoint(out / "losses=stock" / "last.pt")["state"]
    assert resumed["epoch"] == 2 and repr(resumed["history"][0]) == repr(first_epoch)  # continued, not restarted
    assert "--resume" in calls[0] and "--resume" not in calls[1]
    table = list(csv.DictReader((out / "ablation.csv").read_text().splitlines()))
    assert [(r["losses"], r["mask_threshold"]) for r in table] == [
        ("stock", "0.5"), ("stock", "0.6"), ("report", "0.5"), ("report", "0.6")]
    for r in table:
        for key in ablate.SCORE_FIELDS[:3]:
            assert 0.0 <= float(r[key]) <= 1.0
        assert float(r["train_seconds"]) > 0 and r["epochs"] == "2"
        assert r["ap50_class1"] != "" and r["ap50_class2"] != ""
    # each checkpoint scored at both mask thresholds (the value reaches the masks, not just the label)
    assert thresholds.count(0.6) == 2 and 0.5 in thresholds  # (validation during training uses 0.5 too)
    md = (out / "ablation.md").read_text()
    assert "| run | losses | mask_threshold | seeds | AP50 |" in md and md.count("| losses=") == 4 and "budget 2 epochs" in md
    assert "AP50 ceiling (maxDets 100)" in md
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # everything finished and scored: a second invocation trains nothing and gives the same table
    calls.clear()
    again = ablate.main(argv)
    assert calls == [] and [r["ap50"] for r in again] == [r["ap50"] for r in rows]
    # other shared flags over the same folder would reuse scores made under the old ones: refused
    with pytest.raises(SystemExit, match="other settings"):
        ablate.main(argv[:-len(tiny_args(EPOCHS=2, **SHARED))] + tiny_args(EPOCHS=3, **SHARED))


def test_ablate_each_lever_alone_against_the_base(real_small, tmp_path, monkeypatch):
    calls, reserves = [], []
    real_main, real_set = train.main, predict.set_thresholds
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or real_main(argv))
    monkeypatch.setattr(predict, "set_thresholds", lambda m, s: reserves.append(s["CLASS_RESERVE"]) or real_set(m, s))
    out = tmp_path / "abl"
    rows = ablate.main(["--data-dir", str(real_small), "--out", str(out), "--each", "--vary", "heads=cascade",
                        "--vary", "ema=0.9", "--vary", "class-reserve=0", "--seeds", "2", "--ensemble", "--"]
                       + tiny_args(EPOCHS=1, **SHARED))
    # not the combinations: a prediction lever scores the base's checkpoints only, a training lever trains once a
    # seed, and the ensemble fuses the base's seeds
    assert [r["label"] for r in rows] == ["base", "base / class-reserve=0"] * 2 + ["base + next seed"] + \
        ["heads=cascade"] * 2 + ["ema=0.9"] * 2
    assert rows[1]["run_dir"] == rows[0]["run_dir"] and rows[1]["class_reserve"] == "0"
    assert all("class_reserve" not in r for r in rows[4:])
    assert reserves.count(0) == 2 and reserves.count(100) == 3 * 2 + 2  # each run scored once, the ensemble its 2
    configs = {r["label"]: load_checkpoint(Path(r["run_dir"]) / "last.pt")["config"] for r in rows}
    assert (configs["base"]["HEADS"], configs["base"]["EMA"]) == ("standard", 0.0)
    assert (configs["heads=cascade"]["HEADS"], configs["heads=cascade"]["EMA"]) == ("cascade", 0.0)
    assert (configs["ema=0.9"]["HEADS"], configs["ema=0.9"]["EMA"]) == ("standard", 0.9)
    assert len(calls) == 6 and all(0.0 <= r["ap50"] <= 1.0 for r in rows)
    md = (out / "ablation.md").read_text()
    assert "| base / class-reserve=0 |" in md and "| heads=cascade |" in md and md.count("| base + next seed |") == 1
    with pytest.raises(SystemExit, match="CASCADE_SCORE_STAGES would change nothing"):
        ablate.main(["--data-dir", str(real_small), "--out", str(tmp_path / "b"), "--each", "--vary",
                     "cascade-score-stages=2", "--"] + tiny_args(EPOCHS=1, **SHARED))


def test_together_adds_the_levers_combined_after_each_alone():
    """--each --together: base, each training value alone, then all of them in one row (scored with infer.py's
    defaults); an inference value stays a row on the base. Several values of a lever, or a single lever, refused."""
    training, inference = ablate.constants()
    varied = ablate.parse_vary(["scale=1", "to-gray=0", "class-reserve=0"])
    rows = ablate.grids(varied, training, inference, each=True, together=True)
    assert [a for a, _ in rows] == [(), (("SCALE", "1"),), (("TO_GRAY", "0"),), (("SCALE", "1"), ("TO_GRAY", "0"))]
    assert rows[0][1] == [(), (("CLASS_RESERVE", "0"),)] and rows[-1][1] == [()]
    assert ablate.run_name(rows[-1][0]) == "scale=1,to-gray=0"
    assert ablate.flags(rows[-1][0]) == ["--scale", "1", "--to-gray", "0"]
    for bad in (["scale=1,2", "to-gray=0"], ["scale=1"]):
        with pytest.raises(SystemExit, match="one value each") as refused:
            ablate.grids(ablate.parse_vary(bad), training, inference, each=True, together=True)
        assert "scale=1" in str(refused.value)  # the flags as the user typed them
    with pytest.raises(SystemExit, match="give --each"):
        ablate.grids(varied, training, inference, each=False, together=True)
    with pytest.raises(SystemExit, match="give --each"):
        ablate.parse_args(["--data-dir", "d", "--out", "o", "--together", "--vary", "scale=1"])


def test_ablate_time_budget_seeds_ensembles_and_the_peer_tuned_on_val(real_small, tmp_path):
    out = tmp_path / "abl"
    grid = [("sgd", 0.00125, "multistep"), ("adamw", 1e-3, "cosine")]
    rows = ablate.main(["--data-dir", str(real_small), "--out", str(out), "--peer", "--peer-backbone", "resnet18",
                        "--peer-grid", "sgd:0.00125,adamw:1e-3:cosine", "--ensemble",
                        "--seeds", "2", "--minutes", "0.005", "--"] + tiny_args(EPOCHS=5, SEED=7, MIN_VAL_IMAGES=1,
                                                                                **SHARED))
    assert [(r["label"], r["seed"]) for r in rows] == [("base", 7), ("base", 8), ("base + next seed", 7),
                                                       ("peer (tuned)", 7), ("peer (tuned)", 8)]
    # the ensemble row (two seeds: their one pair): both seeds' checkpoints fused; its cost is both runs'
    assert rows[2]["steps"] == rows[0]["steps"] + rows[1]["steps"]
    runs = {seed: load_checkpoint(out / f"base,seed={seed}" / "last.pt") for seed in (7, 8)}
    for ckpt in runs.values():
        assert ckpt["epoch"] == 1 < 5 and ckpt["state"]["train_seconds"] >= 0.3  # stopped by the budget, mid-epoch
    assert runs[7]["config"]["SEED"] == 7 and runs[8]["config"]["SEED"] == 8
    assert runs[7]["val_ids"] == runs[8]["val_ids"]  # the seeds share one split
    # the grid trained with the first seed; the best val AP50 (its best.pt's) picked the setting, never the test images
    name = lambda o, lr, schedule: f"{o}-{lr:g}" + ("" if schedule == "multistep" else f"-{schedule}")  # noqa: E731
    grid = {k: load_checkpoint(out / "peer" / name(*k) / "last.pt") for k in grid}
    assert [c["config"]["SCHEDULE"] for c in grid.values()] == ["multistep", "cosine"]
    val = {k: c["state"]["best_ap50"] for k, c in grid.items()}
    chosen = max(val, key=val.get)
    assert (out / "peer" / name(*chosen) / "score.json").is_file()
    assert not any((out / "peer" / name(*k) / "score.json").is_file() for k in val if k != chosen)
    second = load_checkpoint(out / "peer" / f"{name(*chosen)},seed=8" / "last.pt")
    assert (second["config"]["OPTIMIZER"], second["config"]["SCHEDULE"]) == (chosen[0], chosen[2])
    assert second["config"]["SEED"] == 8
    assert second["state"]["train_seconds"] >= 0.3 and all(r["steps"] >= 1 for r in rows)
    assert all(0.0 <= r["ap50"] <= 1.0 for r in rows)
    md = (out / "ablation.md").read_text()
    assert "or 0.005 min of training per run" in md and "seeds 7, 8" in md and "| chosen |" in md
    assert md.count("| base |") == 1 and "| peer (tuned) |" in md  # one line per configuration
    assert md.count("| base + next seed |") == 1
    with pytest.raises(SystemExit, match="--peer-grid 'lamb:1e-3'"):
        ablate.main(["--data-dir", str(real_small), "--out", str(out), "--peer-grid", "lamb:1e-3"])
    assert ablate.parse_peer_grid("adamw:2e-4, SGD:0.01:cosine") == [("adamw", 2e-4, "multistep"),
                                                                       ("sgd", 0.01, "cosine")]
    for bad in ("adamw:2e-4:step", "adamw", "adamw:2e-4:cosine:x", "adamw:-1"):
        with pytest.raises(SystemExit, match=f"--peer-grid '{bad}'"):
            ablate.parse_peer_grid(bad)
    with pytest.raises(SystemExit, match="--seeds 2 or more"):
        ablate.main(["--data-dir", str(real_small), "--out", str(out), "--ensemble"])


def test_the_peer_keeps_the_weights_of_its_best_val_epoch(real_small, tmp_path, monkeypatch):
    """As train.py for ours: best.pt is the epoch of the best val AP50, not the last; a NaN val AP50 picks
    nothing; with fewer val images than min_val_images, best.pt is the latest weights."""
    scripted = iter([float("nan"), 0.3, 0.2, 0.1, 0.3])
    monkeypatch.setattr(peer.evaluate, "coco_evaluate", lambda *a, **k: {"ap50": next(scripted)})
    run = dict(backbone="resnet18", min_size=64, max_size=96, val_fraction=0.34, seed=0, optimizer="adamw", lr=1e-4,
               log=lambda *_: None)
    best = peer.train_peer(real_small, tmp_path / "p", epochs=3, **run)
    assert best == tmp_path / "p" / "best.pt"
    assert load_checkpoint(best)["epoch"] == 2 and load_checkpoint(tmp_path / "p" / "last.pt")["epoch"] == 3
    assert load_checkpoint(best)["state"]["best_ap50"] == 0.3
    best = peer.train_peer(real_small, tmp_path / "p", epochs=4, **run)  # resumed: 0.1 is not better
    assert load_checkpoint(best)["epoch"] == 2
    best = peer.train_peer(real_small, tmp_path / "q", epochs=1, min_val_images=99, **run)  # 0.3, but too few images
    assert load_checkpoint(best)["epoch"] == 1 and load_checkpoint(best)["state"]["best_ap50"] == -math.inf


def test_the_peer_cosine_schedule_anneals_over_its_epochs(real_small, tmp_path):
    """schedule cosine: at every step lr x 0.5 (1 + cos(pi step / (epochs x steps an epoch))) after the warm-up,
    as train.py's SCHEDULE cosine; the MultiStepLR is not stepped."""
    run = dict(backbone="resnet18", min_size=64, max_size=96, val_fraction=0.34, seed=0, optimizer="adamw", lr=1e-3,
               log=lambda *_: None)
    peer.train_peer(real_small, tmp_path / "c", epochs=2, schedule="cosine", **run)
    ckpt = load_checkpoint(tmp_path / "c" / "last.pt")
    n = ckpt["state"]["step"] // 2  # the warm-up (n - 1 steps) is over by each epoch's last step
    assert [h["lr"] for h in ckpt["state"]["history"]] == pytest.approx(
        [1e-3 * 0.5 * (1 + math.cos(math.pi * (e * n - 1) / (2 * n))) for e in (1, 2)])
    assert ckpt["config"]["SCHEDULE"] == "cosine"
    with pytest.raises(ValueError, match="peer schedule 'step'"):
        peer.train_peer(real_small, tmp_path / "d", epochs=1, schedule="step", **run)


def test_the_peer_grid_is_chosen_on_best_val_ap50_and_scored_from_best_pt(tmp_path, monkeypatch):
    """The grid point whose best epoch is best wins (not the one with the best final epoch), and the chosen
    setting's best.pt is what is scored."""
    histories = {("adamw", 1e-4, "multistep"): [0.5, 0.1], ("adamw", 2e-4, "cosine"): [0.3, 0.3]}
    scored = []

    def train_peer(data_dir, run_dir, *args, optimizer, lr, schedule, **kwargs):
        run_dir.mkdir(parents=True, exist_ok=True)
        h = histories[(optimizer, lr, schedule)]
        state = {"epoch": 2, "step": 10, "train_seconds": 1.0, "history": [{"val_ap50": v} for v in h],
                 "best_ap50": max(h)}
        save_checkpoint({"model": {}, "config": {}, "state": state, "format": CHECKPOINT_FORMAT}, run_dir / "last.pt")
        return run_dir / "best.pt"

    monkeypatch.setattr(peer, "train_peer", train_peer)
    monkeypatch.setattr(peer, "test_records", lambda checkpoint, *a: scored.append(checkpoint) or [])
    monkeypatch.setattr(ablate, "score", lambda records, coco_gt, state: {"ap50": 0.2})
    cfg = dict(PRETRAINED=False, PRETRAINED_WEIGHTS="", BACKBONE="resnet18", EPOCHS=2, MIN_SIZE=64, MAX_SIZE=96,
               VAL_FRACTION=0.2, SPLIT_SEED=42, MIN_VAL_IMAGES=1)
    args = argparse.Namespace(peer_grid=list(histories), peer_backbone="", minutes=0.0)
    rows, grid = ablate.run_peer(tmp_path, cfg, args, [1, 2], tmp_path, "cpu", None)
    assert [g["chosen"] for g in grid] == [True, False] and [g["val_ap50"] for g in grid] == [0.5, 0.3]
    assert [g["schedule"] for g in grid] == ["multistep", "cosine"]
    assert scored == [tmp_path / "peer" / "adamw-0.0001" / "best.pt", tmp_path / "peer" / "adamw-0.0001,seed=2" / "best.pt"]
    assert [(r["label"], r["seed"], r["ap50"]) for r in rows] == [("peer (tuned)", 1, 0.2), ("peer (tuned)", 2, 0.2)]


def test_seeds_aggregate_to_mean_and_spread_and_the_ratio_pairs_seeds():
    rows = [{"label": "ours", "seed": 0, "ap50": 0.4}, {"label": "ours", "seed": 1, "ap50": 0.6},
            {"label": "peer (tuned)", "seed": 0, "ap50": 0.2}, {"label": "peer (tuned)", "seed": 1, "ap50": 0.4}]
    for r in rows:
        r.update({f: 1.0 for f in ablate.SCORE_FIELDS if f != "ap50"})
    agg = ablate.aggregate(rows)
    assert agg["ours"]["seeds"] == 2
    assert agg["ours"]["ap50"] == pytest.approx((0.5, math.sqrt(0.02)))  # sample sd of 0.4, 0.6
    assert agg["ours"]["vs_peer"] == pytest.approx((1.75, math.sqrt(0.125)))  # seed 0: 2.0, seed 1: 1.5
    assert agg["peer (tuned)"]["vs_peer"] == pytest.approx((1.0, 0.0))
    assert ablate.mean_sd([0.3]) == (0.3, 0.0) and all(math.isnan(v) for v in ablate.mean_sd([]))


def test_ablate_refuses_an_unknown_constant_and_lists_them(real_small, tmp_path):
    with pytest.raises(SystemExit) as e:
        ablate.main(["--data-dir", str(real_small), "--out", str(tmp_path / "x"), "--vary", "learning-rate=1,2", "--"])
    message = str(e.value)
    assert "learning-rate" in message and "losses" in message and "lr" in message and "mask-threshold" in message


def test_a_rerun_must_share_the_folders_settings(tmp_path):
    """ablate.json pins a folder's settings: the same ones continue it, others are refused (their scores would be
    reused wrongly), and a folder written before ROI_BATCH_SIZE was recorded counts as torchvision's 512."""
    settings = {"data_dir": "d", "minutes": 10.0, "shared": ["--epochs", "3"], "seeds": 3, "scoring": 3, "scale": 1.0,
                "roi_batch_size": 128}
    ablate.check_settings(tmp_path / "a", settings)
    ablate.check_settings(tmp_path / "a", dict(settings))  # the same flags: continued
    with pytest.raises(SystemExit, match="other settings"):
        ablate.check_settings(tmp_path / "a", dict(settings, roi_batch_size=512))
    old = {k: v for k, v in settings.items() if k != "roi_batch_size"}
    ablate.save_json(old, tmp_path / "b" / "ablate.json")
    ablate.check_settings(tmp_path / "b", dict(settings, roi_batch_size=512))
    with pytest.raises(SystemExit, match="other settings"):
        ablate.check_settings(tmp_path / "b", settings)
