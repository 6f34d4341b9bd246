"""torchrun + DistributedDataParallel on CPU (gloo), two processes."""
import csv
import hashlib
import os
import subprocess
import sys

from conftest import ROOT, tiny_args
from model import build_model
from utils import load_checkpoint


def test_two_process_gloo_run_saves_one_checkpoint_with_the_weights_of_both(demo_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    args = tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(run_dir), EPOCHS=2, BATCH_SIZE=1, LR=1e-3, WARMUP_ITERS=1,
                     VAL_FRACTION=0.34, NUM_WORKERS=0, VAL_DETECTIONS_PER_IMAGE=20, DEVICE="cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "device cpu x 2 processes (DDP)" in out
    assert out.count("epoch 1:") == 1 and out.count("epoch 2:") == 1  # rank 0 reports, once
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.json", "last.pt", "learning_curve.png",
                                                        "metrics.csv", "split.json", "train.log"]
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["state"]["step"] == 4  # 4 training images shared by 2 processes: 2 steps an epoch
    # both processes ended with the same parameters: train.py compares their SHA-256 and prints it;
    # the saved weights hash to the same value
    line = next(l for l in out.splitlines() if "processes hold identical weights" in l)
    model = build_model(ckpt["config"], load_pretrained=False)
    model.load_state_dict(ckpt["model"])
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().numpy().tobytes())
    assert f"sha256 {digest.hexdigest()[:16]}" in line


def test_an_out_of_memory_step_and_an_infinite_gradient_on_one_process_are_skipped_by_both(demo_dir, tmp_path):
    """tests/ddp_faults.py: rank 1 runs out of memory in its 2nd step, rank 0 has an infinite gradient in its 3rd;
    both processes skip both steps (no all-reduce left waiting), go on and end with the same weights."""
    run_dir = tmp_path / "faults"
    args = tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(run_dir), EPOCHS=2, BATCH_SIZE=1, LR=1e-3, WARMUP_ITERS=1,
                     VAL_FRACTION=0.34, NUM_WORKERS=0, VAL_DETECTIONS_PER_IMAGE=20, DEVICE="cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "tests/ddp_faults.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 1: out of GPU memory on image " in proc.stderr and "rank 0: out of GPU memory on another process" \
        in proc.stderr
    assert "processes hold identical weights" in proc.stdout
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["oom_steps"]) for r in rows] == [1, 0] and [int(r["skipped_steps"]) for r in rows] == [0, 1]
    assert load_checkpoint(run_dir / "last.pt")["state"]["step"] == 2  # 4 steps over 2 epochs, 2 skipped
