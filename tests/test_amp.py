"""The GPU path, run on the CPU: the AMP dtype rule, fp16 + GradScaler training, box geometry in fp32
under autocast, resume on any number of GPUs, per-rank augmentation streams, and a DDP run in which
one rank fails."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

import ddp
import engine
import losses
import train
from conftest import ROOT, SIZING, TINY, tiny_args
from dataset import CellDataset, collate, list_train_ids
from model import Float32MaskPredictor, build_model
from utils import load_checkpoint, rng_state, save_checkpoint, set_rng_state


# ---- which dtype ------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, dtype", [((6, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                               (None, None)])
def test_auto_takes_bf16_only_where_the_gpu_has_it_natively(capability, dtype):
    got, why = engine.amp_rule("auto", capability)
    assert got == dtype
    assert ("GradScaler" in why) == (dtype == torch.float16)  # the log says why, and whether a scaler runs


def test_forced_settings():
    assert engine.amp_rule("off", (9, 0))[0] is None
    assert engine.amp_rule("fp16", None)[0] == torch.float16  # the T4's path also runs on the CPU
    assert engine.amp_rule("bf16", None)[0] == torch.bfloat16
    assert engine.amp_rule("bf16", (8, 6))[0] == torch.bfloat16
    with pytest.raises(SystemExit, match=r"capability 7.5 has no native bf16.*--amp fp16"):
        engine.amp_rule("bf16", (7, 5))  # emulated bf16 on a T4: slower than fp32, refused with advice
    with pytest.raises(SystemExit, match="choose auto, fp16, bf16 or off"):
        engine.amp_rule("fp8", None)
    assert engine.amp_dtype("auto", torch.device("cpu"))[0] is None


# ---- fp16 + GradScaler, as on a T4 ------------------------------------------------------------
def narrow_mask_head(model, width=32):
    """torchvision's mask head is 256 channels wide whatever the FPN; CPU fp16 convolution backward runs
    on reference kernels (~100x slower than fp32), so the fp16 test trains a narrower one."""
    model.roi_heads.mask_head = MaskRCNNHeads(model.backbone.out_channels, [width, width], 1)
    model.roi_heads.mask_predictor = Float32MaskPredictor(width, width, model.roi_heads.box_predictor.cls_score.out_features)
    return model


def train_steps(demo_dir, dtype, epochs=3):
    torch.manual_seed(0)
    model = narrow_mask_head(build_model(dict(TINY, LOSSES="report", MIN_SIZE=64, MAX_SIZE=96, ROI_BATCH_SIZE=16)))
    ds = CellDataset(demo_dir, list_train_ids(demo_dir)[:2], train=False, sizing=(64, 96, 0.0))
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for g in opt.param_groups:
        g["initial_lr"] = 1e-3
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    calls = []
    for name in ("unscale_", "step"):  # count the scaler's work: unscale before clipping, then a scaled step
        method = getattr(scaler, name)
        setattr(scaler, name, lambda *a, _m=method, _n=name, **k: (calls.append(_n), _m(*a, **k))[1])
    scaler.calls = calls
    state, means = {"epoch": 0, "step": 0}, []
    overflows = 0
    for epoch in range(epochs):
        torch.manual_seed(epoch)  # the same RoI sampling in both runs
        cfg = {"WARMUP_ITERS": 0, "EPOCHS": epochs, "SCHEDULE": "plateau", "GRAD_CLIP": 1.0}
        stats, skipped = engine.train_one_epoch(model, opt, loader, "cpu", state, cfg,
                                               weights=losses.preset_weights("report"), scaler=scaler, dtype=dtype)
        state["epoch"] += 1
        # fp16: a step whose scaled gradients overflow is the GradScaler's to skip (it lowers its scale), counted
        assert skipped["oom_steps"] == 0 and (dtype == torch.float16 or skipped["skipped_steps"] == 0)
        overflows = overflows + skipped["skipped_steps"] if epoch else skipped["skipped_steps"]
        means.append(stats["train_loss"])
    assert state["step"] == 2 * epochs - overflows  # a skipped step does not count
    scaler.overflows = overflows
    return means, scaler


def test_fp16_with_gradscaler_and_clipping_trains_on_the_cpu_close_to_fp32(demo_dir):
    fp16, scaler = train_steps(demo_dir, torch.float16)
    fp32, _ = train_steps(demo_dir, None)
    assert np.isfinite(fp16).all() and fp16[-1] < fp16[0]
    # every step of 3 x 2 images unscales before clipping; a step whose gradients overflowed is not taken
    assert scaler.is_enabled() and scaler.calls.count("unscale_") == 6
    assert scaler.calls.count("step") == 6 - scaler.overflows
    assert np.isfinite(scaler.get_scale())
    assert fp32[-1] < fp32[0]
    # the first epoch starts from the same weights: fp16 matches fp32 there; later epochs follow trajectories
    # that part ways (at lr 1e-3 on two images a rounding difference grows), so only learning is asked of them
    assert np.allclose(fp16[0], fp32[0], rtol=0.1), (fp16, fp32)


# ---- box geometry in fp32 under autocast --------------------------------------------------------
def one_step_geometry(model, image, target, dtype):
    """Anchors, RPN proposals, CIoU inputs and the FPN output of one training step under autocast(dtype)."""
    seen = {}
    hooks = [model.rpn.anchor_generator.register_forward_hook(lambda m, i, o: seen.__setitem__("anchors", o)),
             model.rpn.register_forward_hook(lambda m, i, o: seen.__setitem__("proposals", o[0])),
             model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o["0"]))]
    ciou = losses.complete_box_iou_loss

    def spy(pred, gt, **kw):
        seen["ciou"] = (pred, gt)
        return ciou(pred, gt, **kw)
    losses.complete_box_iou_loss = spy
    try:
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
            loss_dict = model([image], [target])
    finally:
        losses.complete_box_iou_loss = ciou
        for h in hooks:
            h.remove()
    assert all(torch.isfinite(v) for v in loss_dict.values())
    return seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_anchors_proposals_and_ciou_inputs_stay_fp32_under_autocast(demo_dir, dtype):
    torch.manual_seed(0)
    model = build_model(dict(TINY, LOSSES="report")).train()
    image, target = CellDataset(demo_dir, list_train_ids(demo_dir)[:1], sizing=SIZING)[0]
    reference = one_step_geometry(model, image, target, None)
    seen = one_step_geometry(model, image, target, dtype)
    assert seen["features"].dtype == dtype  # the convolutions do run in half precision
    assert all(a.dtype == torch.float32 for a in seen["anchors"])
    assert all(torch.equal(a, r) for a, r in zip(seen["anchors"], reference["anchors"]))
    assert all(p.dtype == torch.float32 for p in seen["proposals"])
    pred, gt = seen["ciou"]
    assert pred.dtype == gt.dtype == torch.float32
    # the regression targets decode back to the cells they were matched to (a half-precision decode
    # would move them by pixels): CIoU of perfect deltas is 0
    cells = target["boxes"]
    matched = cells[torch.cdist(gt, cells, p=float("inf")).argmin(1)]
    assert torch.allclose(gt, matched, atol=1e-3)
    assert float(losses.complete_box_iou_loss(gt, matched, reduction="sum")) < 1e-5


# ---- resume on another machine ----------------------------------------------------------------
def test_rng_state_restored_on_another_machine(monkeypatch):
    state = rng_state()
    state["cuda"] = torch.zeros(16, dtype=torch.uint8)  # saved on a GPU
    assert "not restored" in set_rng_state(state, "cpu")[0]  # resumed on the CPU
    restored, seeded = [], []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append(torch.device(device)))
    monkeypatch.setattr("utils._seed_cuda", lambda device, seed: seeded.append((torch.device(device), seed)))
    assert set_rng_state(state, torch.device("cuda", 1)) == [] and restored == [torch.device("cuda", 1)]
    del state["cuda"]
    assert "trained on the CPU" in set_rng_state(state, torch.device("cuda", 0), cuda_seed=7)[0]
    assert seeded[-1] == (torch.device("cuda", 0), 7)


def test_resume_saved_by_two_processes_on_two_gpus_continues_on_one_cpu(demo_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(run_dir), EPOCHS=1, VAL_FRACTION=0.34, NUM_WORKERS=0,
                     VAL_DETECTIONS_PER_IMAGE=20, DEVICE="cpu")
    train.main(args)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert len(ckpt["rng_ranks"]) == 1  # one process: one set of streams
    cuda = torch.zeros(16, dtype=torch.uint8)
    state, loader_state = ckpt["rng_ranks"][0]
    ckpt["rng_ranks"] = [(dict(state, cuda=cuda), loader_state)] * 2  # as two processes on two GPUs save them
    save_checkpoint(ckpt, run_dir / "last.pt")
    capsys.readouterr()
    train.main(["--run-dir", str(run_dir), "--resume", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "random streams of 2 process(es); this run has 1" in out and "CUDA random state is not restored" in out
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2


# ---- DDP: per-rank augmentation streams, a failing rank ----------------------------------------
class Draws(torch.utils.data.Dataset):
    """Each item: a number drawn from the worker's torch RNG (where augmentation draws from)."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(()), {}


def first_draws(rank, world=2, workers=2):
    cfg = {"SEED": 42, "BATCH_SIZE": 1, "NUM_WORKERS": workers}
    loader, sampler, _ = train.make_train_loader(Draws(), cfg, rank, world, torch.device("cpu"))
    sampler.set_epoch(0)
    return [float(images[0]) for images, _ in loader]


def test_each_rank_draws_its_own_augmentation_stream_reproducibly():
    rank0, rank1 = first_draws(0), first_draws(1)
    assert len(rank0) == len(rank1) == 4  # each rank half of the 8 items
    assert not set(rank0) & set(rank1)  # worker k of rank 0 and of rank 1 draw differently
    assert first_draws(0) == rank0 and first_draws(1) == rank1  # and the same again on a rerun


FAILING_RUN = """
import runpy, sys
import torch.distributed as dist
import engine
def failing_evaluate(*args, **kwargs):
    if dist.get_rank() == 0:
        raise RuntimeError("validation blew up")
    raise AssertionError("only rank 0 validates")
engine.evaluate_model = failing_evaluate
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_rank_that_fails_in_validation_stops_the_other_at_once(demo_dir, tmp_path):
    script = tmp_path / "failing_train.py"
    script.write_text(FAILING_RUN)
    args = tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(tmp_path / "ddp"), EPOCHS=2, BATCH_SIZE=1, LR=1e-3,
                     WARMUP_ITERS=1, VAL_FRACTION=0.34, NUM_WORKERS=0, VAL_DETECTIONS_PER_IMAGE=20, DEVICE="cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--tee", "3", str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 0 failed while validating (RuntimeError: validation blew up); rank 1 stops too" in out, out[-3000:]
    assert "validation blew up" in out
    assert elapsed < 120, elapsed  # seconds, not the process group's two-hour timeout


def test_an_epoch_in_which_no_step_ran_still_plots(tmp_path):
    """A time budget can end an epoch before its first step (or every step is skipped): no train loss."""
    nan = float("nan")
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_ap50": 0.1},
               {"epoch": 2, "val_loss": nan, "val_ap50": nan}]
    train.plot_curves(history, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert ddp.max_over_ranks(3.5, torch.device("cpu")) == 3.5  # a plain run: its own figure
