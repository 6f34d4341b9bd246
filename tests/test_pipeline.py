import json
import math

import pytest
import torch

import evaluate
import infer
import train
from conftest import SIZING, TINY, tiny_args
from dataset import CellDataset, collate, list_train_ids
from model import build_model, set_thresholds
from utils import CheckpointError, load_checkpoint
import engine
import predict


def test_short_overfit_raises_ap50(demo_dir):
    torch.manual_seed(0)
    ids = list_train_ids(demo_dir)[:2]
    data = CellDataset(demo_dir, ids, train=False)  # own size: scored as at test time
    sized = CellDataset(demo_dir, ids, train=False, sizing=SIZING)
    model = set_thresholds(build_model(TINY), infer.prediction_settings(DETECTIONS_PER_IMAGE=100))
    gt = evaluate.val_ground_truth(data)
    opts = predict.predict_options(TINY, infer.prediction_settings(DETECTIONS_PER_IMAGE=100))
    start, _ = engine.evaluate_model(model, data, "cpu", opts, coco_gt=gt)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = collate([sized[0], sized[1]])
    for step in range(80):
        model.train()
        loss = sum(model(list(batch[0]), list(batch[1])).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    end, _ = engine.evaluate_model(model, data, "cpu", opts, coco_gt=gt)
    print(f"AP50 before {start['ap50']:.3f} after {end['ap50']:.3f}")
    assert start["ap50"] < 0.05
    assert end["ap50"] > start["ap50"] + 0.3


@pytest.fixture(scope="module")
def trained_run(demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    args = tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(run_dir), EPOCHS=2, BATCH_SIZE=2, LR=1e-3,
                     WARMUP_ITERS=2, VAL_FRACTION=0.34, NUM_WORKERS=0, VAL_DETECTIONS_PER_IMAGE=50)
    train.main(args)
    return run_dir, args


def test_training_writes_the_run_folder(trained_run):
    run_dir, _ = trained_run
    for name in ("config.json", "split.json", "metrics.csv", "learning_curve.png", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,lr,train_loss") and len(rows) == 3
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["BACKBONE"] == TINY["BACKBONE"] and cfg["EPOCHS"] == 2
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["val"]) == 2 and len(split["train"]) == 4
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert cfg.pop("amp_dtype") == "float32" and "CPU" in cfg.pop("amp_why")  # the precision it trained in, and why
    # how validation predicts: infer.py's prediction constants, but its own detection limit
    assert cfg.pop("VALIDATION") == infer.prediction_settings(DETECTIONS_PER_IMAGE=cfg["VAL_DETECTIONS_PER_IMAGE"])
    assert ckpt["config"] == cfg and ckpt["epoch"] == 2 and ckpt["val_ids"] == split["val"]
    # 2 val images < MIN_VAL_IMAGES: their AP50 is logged but picks nothing; best.pt is the latest weights
    assert all(0.0 <= h["val_ap50"] <= 1.0 for h in ckpt["state"]["history"]) and ckpt["state"]["best_ap50"] == -math.inf
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 2


def test_checkpoint_alone_rebuilds_the_same_model(trained_run, demo_dir):
    run_dir, _ = trained_run
    model, ckpt = predict.load_model(run_dir / "best.pt", "cpu", infer.prediction_settings(DETECTIONS_PER_IMAGE=30))
    reference = set_thresholds(build_model(ckpt["config"], load_pretrained=False),
                               infer.prediction_settings(DETECTIONS_PER_IMAGE=30))
    reference.load_state_dict(ckpt["model"])
    reference.eval()
    image, _ = CellDataset(demo_dir, ckpt["val_ids"])[0]
    with torch.no_grad():
        a, b = model([image])[0], reference([image])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["mask_probs"], b["mask_probs"])


def test_infer_writes_a_valid_submission(trained_run, demo_dir, tmp_path, capsys):
    run_dir, _ = trained_run
    out = tmp_path / "test-results.json"
    infer.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(demo_dir), "--output-json", str(out),
                "--num-workers", "0", "--detections-per-image", "20", "--score-threshold", "0.0"])
    results = json.loads(out.read_text())
    table = json.loads((demo_dir / "test_image_name_to_ids.json").read_text())
    assert infer.check_submission(results, table)
    assert {r["image_id"] for r in results} == {rec["id"] for rec in table}  # score 0: every image has some
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    metrics = infer.main(["--checkpoint", str(run_dir / "best.pt"), "--eval", "true", "--num-workers", "0",
                          "--detections-per-image", "50"])
    assert 0.0 <= metrics["ap50"] <= 1.0 and metrics["ap50_maxdets1000"] >= metrics["ap50"] - 1e-9
    assert metrics["tp"] + metrics["fn"] > 0 and set(metrics["per_class_ap50"]) == {1, 2, 3, 4}
    assert "AP50 ceiling (maxDets 100)" in capsys.readouterr().out  # what the metric leaves reachable, said


def test_sweep_matches_eval_and_overlays_are_written(trained_run):
    run_dir, _ = trained_run
    args = ["--checkpoint", str(run_dir / "best.pt"), "--num-workers", "0", "--detections-per-image", "50"]
    evaluated = infer.main(args + ["--eval"])
    swept = infer.main(args + ["--sweep", "--overlay", "2"])
    table = swept["sweep"]
    assert table[(0.5, 0.05)] == evaluated["ap50"]  # the sweep's AP50 at eval's thresholds is eval's AP50
    assert {m for m, _ in table} >= {0.3, 0.5, 0.8} and {s for _, s in table} >= {0.05, 0.5}
    csv = (run_dir / "sweep.csv").read_text().splitlines()
    assert csv[0] == "mask_threshold,score_threshold,ap50" and len(csv) == len(table) + 1
    import cv2
    pngs = sorted((run_dir / "overlays").glob("*.png"))
    assert len(pngs) == 2 and swept["overlays"] and all(p in pngs for p in swept["overlays"])
    panel = cv2.imread(str(pngs[0]))
    assert panel.shape[1] > 1.5 * panel.shape[0]  # ground truth | predictions side by side
    costs = swept["image_costs"]  # the costliest val images are drawn, in that order
    ids = load_checkpoint(run_dir / "best.pt")["val_ids"]
    assert [p.stem for p in swept["overlays"]] == [ids[c["image_id"]] for c in costs[:2]]
    assert [c["cost"] for c in costs] == sorted((c["cost"] for c in costs), reverse=True)
    rows = (run_dir / "image_costs.csv").read_text().splitlines()
    assert rows[0].startswith("image,ap50_cost,missed_class1") and len(rows) == len(ids) + 1


def test_overlay_with_a_submission_draws_test_images(trained_run, demo_dir, tmp_path):
    """--overlay N without --eval/--sweep: the submission as usual, plus PNGs of its first N test images
    in <output stem>-overlays/ (no validation pass, no val overlays)."""
    run_dir, _ = trained_run
    out = tmp_path / "sub.json"
    val_overlays = {p: p.stat().st_mtime_ns for p in (run_dir / "overlays").glob("*.png")}
    written = infer.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(demo_dir), "--output-json",
                          str(out), "--num-workers", "0", "--detections-per-image", "20", "--overlay", "2"])
    assert written == str(out)
    table = json.loads((demo_dir / "test_image_name_to_ids.json").read_text())
    assert infer.check_submission(json.loads(out.read_text()), table)
    pngs = sorted((tmp_path / "sub-overlays").glob("*.png"))
    assert [p.name for p in pngs] == sorted(r["file_name"].replace(".tif", ".png") for r in table[:2])
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "overlays").glob("*.png")} == val_overlays


def test_tta_and_tiling_options_on_a_trained_model(trained_run):
    run_dir, _ = trained_run
    args = ["--checkpoint", str(run_dir / "best.pt"), "--num-workers", "0", "--detections-per-image", "50", "--eval"]
    tiled = infer.main(args + ["--tta", "flips+scales", "--input-scale", "3.0"])  # 64-96 px images x3: tiles of 53 px
    assert 0.0 <= tiled["ap50"] <= 1.0
    with pytest.raises(SystemExit, match="choose none, flips or flips"):
        infer.main(args + ["--tta", "mirror"])


def test_training_at_a_fixed_scale_crops_and_validates_in_tiles(demo_dir, tmp_path, capsys):
    run_dir = tmp_path / "scaled"
    train.main(tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(run_dir), EPOCHS=1, BATCH_SIZE=2, WARMUP_ITERS=1,
                         VAL_FRACTION=0.34, NUM_WORKERS=0, VAL_DETECTIONS_PER_IMAGE=20, SCALE=2.0))
    out = capsys.readouterr().out
    assert "input x2 (random 80-px crops of larger images)" in out  # 64-96 px images x2 > MAX_SIZE 160
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["config"]["SCALE"] == 2.0 and 0.0 <= ckpt["state"]["history"][0]["val_ap50"] <= 1.0
    opts = predict.predict_options(ckpt["config"], infer.prediction_settings())
    assert opts["sizing"] == (TINY["MIN_SIZE"], TINY["MAX_SIZE"], 2.0)  # inference sizes as trained


@pytest.mark.parametrize("bad, message", [
    ({"category_id": 5}, "category_id"), ({"image_id": 999}, "not in the test-id table"),
    ({"segmentation": {"size": [1, 1], "counts": "01"}}, "mask size"),
    ({"segmentation": {"size": [2, 2], "counts": b"04"}}, "must be a str")])
def test_submission_check_refuses_bad_records(bad, message):
    table = [{"file_name": "a.tif", "id": 1, "height": 2, "width": 2}]
    good = {"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5, "category_id": 1,
            "segmentation": {"size": [2, 2], "counts": "04"}}
    assert infer.check_submission([good], table)
    with pytest.raises(infer.SubmissionError, match=message):
        infer.check_submission([dict(good, **bad)], table)


def test_existing_run_is_not_overwritten_and_resume_continues(trained_run):
    run_dir, args = trained_run
    with pytest.raises(SystemExit, match="--resume"):
        train.main(args)
    before = load_checkpoint(run_dir / "last.pt")
    train.main(["--run-dir", str(run_dir), "--resume", "--epochs", "3"])
    after = load_checkpoint(run_dir / "last.pt")
    assert after["epoch"] == 3 and len(after["state"]["history"]) == 3
    assert repr(after["state"]["history"][:2]) == repr(before["state"]["history"])  # repr: NaN (a class without cells) equals NaN
    assert after["config"]["EPOCHS"] == 3 and after["config"]["BACKBONE"] == TINY["BACKBONE"]
    mtime = (run_dir / "last.pt").stat().st_mtime_ns
    train.main(["--run-dir", str(run_dir), "--resume"])  # finished: nothing is retrained
    assert (run_dir / "last.pt").stat().st_mtime_ns == mtime


def test_a_checkpoint_of_an_earlier_repo_version_is_refused_clearly(trained_run, tmp_path, demo_dir):
    """Checkpoints are read in today's format only (utils.CHECKPOINT_FORMAT): an older one is refused by infer.py
    and by a resume, with the file and what to do named, not a KeyError deep inside."""
    import shutil
    run_dir, _ = trained_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    ckpt = torch.load(old / "last.pt", weights_only=False)
    del ckpt["format"]
    torch.save(ckpt, old / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt was written by an earlier version of this repo"):
        infer.main(["--checkpoint", str(old / "last.pt"), "--data-dir", str(demo_dir), "--output-json",
                    str(tmp_path / "sub.json"), "--num-workers", "0"])
    with pytest.raises(CheckpointError, match="train anew"):
        train.main(["--run-dir", str(old), "--resume", "--epochs", str(ckpt["epoch"] + 1)])


def test_resume_reproduces_the_uninterrupted_run(trained_run, tmp_path):
    """Epoch 2 after stopping at epoch 1 and resuming equals epoch 2 of the uninterrupted run."""
    run_dir, args = trained_run
    uninterrupted = load_checkpoint(run_dir / "last.pt")["state"]["history"][1]
    interrupted = tmp_path / "r2"
    args = list(args)
    args[args.index("--run-dir") + 1] = str(interrupted)
    args[args.index("--epochs") + 1] = "1"
    train.main(args)
    train.main(["--run-dir", str(interrupted), "--resume", "--epochs", "2"])
    resumed = load_checkpoint(interrupted / "last.pt")["state"]["history"][1]
    for key in ("train_loss", "loss_mask", "val_loss", "val_ap50", "val_ap", "lr"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(trained_run, tmp_path):
    """SIGKILL while epoch 2 trains; --resume redoes epoch 2 from last.pt and lands where the
    uninterrupted run did."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    run_dir, args = trained_run
    uninterrupted = load_checkpoint(run_dir / "last.pt")["state"]["history"][1]
    killed = tmp_path / "killed"
    args = list(args)
    args[args.index("--run-dir") + 1] = str(killed)
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while not (killed / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # metrics.csv is written right after epoch 1's last.pt
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(killed / "last.pt")["epoch"] == 1  # killed during epoch 2
    train.main(["--run-dir", str(killed), "--resume"])
    resumed = load_checkpoint(killed / "last.pt")
    assert resumed["epoch"] == 2
    for key in ("train_loss", "loss_mask", "val_loss", "val_ap50", "val_ap", "lr"):
        assert resumed["state"]["history"][1][key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key


def test_infer_fuses_an_ensemble_of_checkpoints(trained_run, demo_dir, tmp_path, capsys):
    """--checkpoint a.pt,b.pt: each rebuilt from its own configuration (here b at another input size),
    their detections fused; the same checkpoint twice scores as itself; --eval refuses a member that
    trained on the val split it would be scored on."""
    run_dir, _ = trained_run
    best = run_dir / "best.pt"
    ckpt = load_checkpoint(best)
    other = tmp_path / "bigger.pt"
    torch.save({**ckpt, "config": dict(ckpt["config"], MIN_SIZE=128, MAX_SIZE=200)}, other)
    args = ["--num-workers", "0", "--detections-per-image", "50"]
    single = infer.main(["--checkpoint", str(best), "--eval"] + args)
    twice = infer.main(["--checkpoint", f"{best},{best}", "--eval"] + args)
    assert twice["ap50"] == pytest.approx(single["ap50"], abs=1e-3)
    mixed = infer.main(["--checkpoint", f"{best},{other}", "--eval"] + args)
    out = capsys.readouterr().out
    assert "MIN_SIZE 128" in out and "an ensemble of 2 checkpoints" in out
    assert 0.0 <= mixed["ap50"] <= 1.0
    sub = tmp_path / "sub.json"
    infer.main(["--checkpoint", f"{best},{other}", "--data-dir", str(demo_dir), "--output-json", str(sub)] + args)
    table = json.loads((demo_dir / "test_image_name_to_ids.json").read_text())
    assert infer.check_submission(json.loads(sub.read_text()), table)
    leaky = tmp_path / "leaky.pt"
    torch.save({**ckpt, "train_ids": ckpt["train_ids"] + ckpt["val_ids"][:1]}, leaky)
    with pytest.raises(SystemExit, match="trained on 1 image"):
        infer.main(["--checkpoint", f"{best},{leaky}", "--eval"] + args)


def test_checkpoint_lists_split_after_pt_only(tmp_path):
    """bench/ablate.py's run folders hold commas ('heads=cascade,seed=42'): such a path stays one checkpoint."""
    run = tmp_path / "heads=cascade,seed=42"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    assert infer.checkpoint_list(str(run / "best.pt")) == [str(run / "best.pt")]
    assert infer.checkpoint_list("runs/a,seed=1/best.pt, runs/b/last.pt") == ["runs/a,seed=1/best.pt", "runs/b/last.pt"]
    assert infer.checkpoint_list("x.pth,y.pt") == ["x.pth", "y.pt"] and infer.checkpoint_list("") == []
