"""The run's clock and its budgets (clock.py, train.py RUN_MINUTES), the log that stays (train.log), the per-class
val AP50 columns, and what a training step does on a GPU fault: out of memory, an infinite gradient (engine.py)."""
import csv
import math
import time

import pytest
import torch

import clock
import engine
import train
from clock import RunClock
from conftest import InfiniteGradient, tiny_args
from dataset import CellDataset, collate, list_train_ids
from utils import load_checkpoint

CFG = {"EPOCHS": 50, "RUN_MINUTES": 60.0, "RESERVE_PASSES": 100, "MAX_MINUTES": 0.0}


# ---- the clock ------------------------------------------------------------------------------------
def test_the_clock_plans_from_warm_steps_and_keeps_validation_save_and_reserve_free():
    c = RunClock(CFG, steps_per_epoch=200, val_images=20, val_passes=1, start=1000.0, checkpoint_mb=2000)
    assert c.epoch_estimate() is None and c.plan(0) == "plan: no step timed yet"
    for s in [9.0] * clock.WARM_STEPS + [1.0] * clock.PLAN_STEPS:  # slow warm-up steps are not what a step costs
        first = c.step_done(s)
    assert first and c.step_seconds() == 1.0
    assert c.save_estimate() == pytest.approx(2000 / clock.DISK_MB_PER_S)  # a guess until a save is timed
    assert c.validation_estimate() == 20 * 2 * 1.0  # a guess until a validation is timed
    c.validated(30.0, 1.2)
    c.saved(10.0)
    assert c.reserve() == pytest.approx(100 * 1.2 * clock.MARGIN)
    assert c.epoch_estimate() == 200 + 30 + 10
    deadline = 1000 + 3600 - 100 * 1.2 * clock.MARGIN - clock.MARGIN * (30 + 10)
    assert c.train_deadline() == pytest.approx(deadline)
    assert not c.must_stop(now=deadline - 1) and c.must_stop(now=deadline)
    assert c.room_for_an_epoch(now=deadline - 11) and not c.room_for_an_epoch(now=deadline - 9)
    assert c.epochs_that_fit(now=1000.0) == int((3600 - 180) // 240)
    text = c.plan(0, now=1000.0)
    assert "1.00 s a step" in text and "200 steps an epoch" in text and "14 of the 50 epochs to go fit" in text


def test_without_a_budget_nothing_stops_and_the_plan_counts_epochs():
    c = RunClock(dict(CFG, RUN_MINUTES=0.0), steps_per_epoch=10, val_images=0, val_passes=1, start=0.0)
    for _ in range(30):
        c.step_done(2.0)
    assert c.train_deadline() is None and not c.must_stop() and c.room_for_an_epoch()
    assert c.epochs_that_fit() is None and "50 more epoch(s)" in c.plan(0, now=0.0)
    assert "elapsed" in c.eta(3, now=60.0) and "ETA" in c.eta(3, now=60.0)


def test_a_resumed_run_starts_from_its_last_measured_validation():
    history = [{"val_seconds": 50.0, "val_seconds_per_image": 2.0}, {"val_seconds": float("nan")}]
    c = RunClock(CFG, steps_per_epoch=10, val_images=20, val_passes=2, start=0.0, history=history)
    assert c.validation_estimate() == 50.0 and c.reserve() == pytest.approx(100 * 1.0 * clock.MARGIN)


# ---- the whole-run budget, train.log, per-class columns --------------------------------------------
def run_args(demo_dir, run_dir, **extra):
    return tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(run_dir), BATCH_SIZE=1, LR=1e-3, WARMUP_ITERS=1,
                     VAL_FRACTION=0.34, NUM_WORKERS=0, VAL_DETECTIONS_PER_IMAGE=20, **extra)


def test_run_minutes_stops_in_time_with_both_checkpoints_and_resumes(demo_dir, tmp_path):
    run_dir, budget = tmp_path / "run", 0.5  # minutes; an epoch of the tiny model takes ~15-20 s here
    t0 = time.time()
    train.main(run_args(demo_dir, run_dir, EPOCHS=1000, RUN_MINUTES=budget))
    took = time.time() - t0
    assert took < budget * 60 + 5, took  # validation and checkpoints included
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert 1 <= ckpt["epoch"] < 1000 and (run_dir / "best.pt").is_file()
    log = (run_dir / "train.log").read_text()
    assert "RUN_MINUTES 0.5" in log and "continue later with --resume" in log and "plan:" in log
    assert "\r" not in log and "epoch 1/1000" not in log  # no progress bars in the log
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {f"val_ap50_class{k}" for k in range(1, 5)} | {"oom_steps", "elapsed_seconds", "val_seconds",
                                                          "gpu_peak_allocated_gb"} <= set(rows[0])
    assert float(rows[-1]["elapsed_seconds"]) < budget * 60 + 5
    assert not math.isnan(float(rows[0]["val_ap50_class2"]))  # the demo's val images hold class 2 cells
    train.main(["--run-dir", str(run_dir), "--resume", "--run-minutes", "0.4"])  # a resume gets its own budget
    assert load_checkpoint(run_dir / "last.pt")["epoch"] > ckpt["epoch"]
    assert (run_dir / "train.log").read_text().startswith(log)  # the resume's lines go after the first run's


def test_a_bad_budget_is_refused(demo_dir, tmp_path):
    with pytest.raises(SystemExit, match="--run-minutes"):
        train.main(run_args(demo_dir, tmp_path / "r", RUN_MINUTES=-1.0))
    with pytest.raises(SystemExit, match="--reserve-passes"):
        train.main(run_args(demo_dir, tmp_path / "r", RESERVE_PASSES=-3))


def test_the_reason_a_run_stopped_stays_in_its_log(demo_dir, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise FloatingPointError("20 consecutive non-finite losses (test)")
    monkeypatch.setattr(engine, "train_one_epoch", fail)
    with pytest.raises(FloatingPointError):
        train.main(run_args(demo_dir, tmp_path / "r", EPOCHS=1))
    assert "error: FloatingPointError: 20 consecutive non-finite losses (test)" in (tmp_path / "r" / "train.log").read_text()


# ---- faults in a training step -------------------------------------------------------------------------
class Faulty(torch.nn.Module):
    """A one-weight model whose call n raises a CUDA out-of-memory error ('oom') or has an infinite gradient
    ('inf'), as faults says."""

    def __init__(self, faults):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.faults, self.calls = faults, 0

    def forward(self, images, targets):
        self.calls += 1
        fault = self.faults.get(self.calls) if isinstance(self.faults, dict) else self.faults
        if fault == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        loss = self.w * 1.0
        return {"loss_classifier": InfiniteGradient.apply(loss) if fault == "inf" else loss}


def epoch_of(model, demo_dir, ema=None):
    ds = CellDataset(demo_dir, list_train_ids(demo_dir)[:4])
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate)
    cfg = {"WARMUP_ITERS": 0, "SCHEDULE": "plateau", "EPOCHS": 1, "GRAD_CLIP": 10.0}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for g in opt.param_groups:
        g["initial_lr"] = 0.1
    state = {"epoch": 0, "step": 0}
    stats, faults = engine.train_one_epoch(model, opt, loader, "cpu", state, cfg, weights={"loss_classifier": 1.0},
                                           ema=ema)
    return state, faults, opt, ds


def test_an_out_of_memory_step_is_skipped_and_named(demo_dir, capsys):
    model = Faulty({2: "oom"})
    state, faults, opt, ds = epoch_of(model, demo_dir)
    assert faults == {"skipped_steps": 0, "oom_steps": 1}
    assert state["step"] == 3 and opt.state[model.w]["step"] == 3  # the skipped step moved nothing
    err = capsys.readouterr().err
    image = ds.ids[1]
    assert f"out of GPU memory on image {image} (input " in err and " cells): step skipped (1 in a row)" in err
    assert "MAX_SIZE" in err and "ROI_BATCH_SIZE" in err  # what to lower


def test_out_of_memory_steps_in_a_row_stop_with_advice(demo_dir):
    with pytest.raises(engine.OutOfMemoryStop, match="stopping after 3 in a row.*MAX_SIZE.*--resume"):
        epoch_of(Faulty("oom"), demo_dir)


def test_an_infinite_gradient_skips_the_step_without_touching_weights_schedule_or_average(demo_dir):
    model = Faulty({2: "inf"})
    ema = engine.WeightAverage(model, 0.9)
    steps = []
    update = ema.update
    ema.update = lambda m, step: (steps.append(step), update(m, step))
    state, faults, opt, _ = epoch_of(model, demo_dir, ema)
    assert faults == {"skipped_steps": 1, "oom_steps": 0}
    assert torch.isfinite(model.w) and torch.isfinite(ema.scored(model).w)  # AdamW never saw the inf
    assert all(torch.isfinite(v).all() for v in opt.state[model.w].values())
    assert state["step"] == 3 and steps == [1, 2, 3]  # the warm-up, the schedule and the EMA count 3 steps


def test_non_finite_gradients_in_a_row_stop_the_run(demo_dir, monkeypatch):
    monkeypatch.setattr(engine, "MAX_SKIPPED_STEPS", 3)
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite gradient norms"):
        epoch_of(Faulty("inf"), demo_dir)
