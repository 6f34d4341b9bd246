"""ablate.py on a tiny grid: tables and plot, checkpoints reused for inference-only constants, finished
runs skipped, interrupted runs continued, a time budget, the peer row, and a clear error for a bad name."""
import csv

import pytest

import ablate
import infer
import train
from conftest import tiny_args
from bench.realistic_data import make_realistic_data
from utils import load_checkpoint
import engine
import predict

SHARED = dict(NUM_WORKERS=0, VAL_FRACTION=0.34, WARMUP_ITERS=1, VAL_DETECTIONS_PER_IMAGE=50)


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
    assert resumed["epoch"] == 2 and resumed["history"][0] == first_epoch  # continued, not restarted
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
    assert "| run | losses | mask_threshold | AP50 |" in md and md.count("| losses=") == 4 and "budget 2 epochs" in md
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # everything finished and scored: a second invocation trains nothing and gives the same table
    calls.clear()
    again = ablate.main(argv)
    assert calls == [] and [r["ap50"] for r in again] == [r["ap50"] for r in rows]
    # other shared flags over the same folder would reuse scores made under the old ones: refused
    with pytest.raises(SystemExit, match="other settings"):
        ablate.main(argv[:-len(tiny_args(EPOCHS=2, **SHARED))] + tiny_args(EPOCHS=3, **SHARED))


def test_ablate_each_lever_alone_against_the_base(real_small, tmp_path, monkeypatch):
    calls = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or real_main(argv))
    out = tmp_path / "abl"
    rows = ablate.main(["--data-dir", str(real_small), "--out", str(out), "--each", "--vary", "heads=cascade",
                        "--vary", "ema=0.9,0.99", "--"] + tiny_args(EPOCHS=1, **SHARED))
    assert [r["run"] for r in rows] == ["base", "heads=cascade", "ema=0.9", "ema=0.99"]  # not the 2 combinations
    configs = {r["run"]: load_checkpoint(out / r["run"] / "last.pt")["config"] for r in rows}
    assert (configs["base"]["HEADS"], configs["base"]["EMA"]) == ("standard", 0.0)
    assert (configs["heads=cascade"]["HEADS"], configs["heads=cascade"]["EMA"]) == ("cascade", 0.0)
    assert (configs["ema=0.99"]["HEADS"], configs["ema=0.99"]["EMA"]) == ("standard", 0.99)
    assert len(calls) == 4 and all(0.0 <= r["ap50"] <= 1.0 for r in rows)


def test_ablate_time_budget_and_peer_row(real_small, tmp_path):
    out = tmp_path / "abl"
    rows = ablate.main(["--data-dir", str(real_small), "--out", str(out), "--peer", "--peer-backbone", "resnet18",
                        "--minutes", "0.005", "--"] + tiny_args(EPOCHS=5, **SHARED))
    assert [r["run"] for r in rows] == ["base", "peer (torchvision stock)"]
    ours = load_checkpoint(out / "base" / "last.pt")
    assert ours["epoch"] == 1 < 5 and ours["state"]["train_seconds"] >= 0.3  # stopped by the budget, mid-epoch
    peer = load_checkpoint(out / "peer" / "last.pt")
    assert peer["epoch"] == 1 and peer["state"]["train_seconds"] >= 0.3
    assert all(0.0 <= r["ap50"] <= 1.0 for r in rows)
    assert "or 0.005 min of training per run" in (out / "ablation.md").read_text()


def test_ablate_refuses_an_unknown_constant_and_lists_them(real_small, tmp_path):
    with pytest.raises(SystemExit) as e:
        ablate.main(["--data-dir", str(real_small), "--out", str(tmp_path / "x"), "--vary", "learning-rate=1,2", "--"])
    message = str(e.value)
    assert "learning-rate" in message and "losses" in message and "lr" in message and "mask-threshold" in message
