import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download: a hub call fails at once
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "assets" / "hw3-real"  # the public course material, inside the repo (assets/hw3-real/README.md)
SAMPLE = ASSETS / "sample_train" / "course-sample"

# A CPU-sized model: timm's 0.4M-parameter test ResNet, thin FPN, few RoIs, small images.
TINY = dict(BACKBONE="test_resnet", PRETRAINED=False, PRETRAINED_WEIGHTS="", FREEZE_BN=False, FPN_CHANNELS=32,
            ROI_BATCH_SIZE=64, MIN_SIZE=96, MAX_SIZE=160, LOSSES="stock", HEADS="standard", SCALE=0.0)
SIZING = (TINY["MIN_SIZE"], TINY["MAX_SIZE"], 0.0)  # CellDataset(sizing=...): images at TINY's input size


def write_sample(root, name="s1", image=None, classes=None):
    """DATA_DIR/train/<name>: image.tif (LZW; default a 24x30 RGBA) and class<k>.tif (float64) for each
    {k: label map} of classes."""
    import numpy as np
    import tifffile
    folder = root / "train" / name
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((24, 30, 4), 200, np.uint8) if image is None else image
    tifffile.imwrite(folder / "image.tif", image, compression="lzw")
    for k, lab in (classes or {}).items():
        tifffile.imwrite(folder / f"class{k}.tif", np.asarray(lab, np.float64))
    return folder


def tiny_args(**extra):
    """TINY (plus extra) as train.py command-line arguments."""
    import json
    args = []
    for k, v in {**TINY, **extra}.items():
        flag = "--" + k.lower().replace("_", "-")
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, (dict, list)):
            v = json.dumps(v)
        args += [flag, str(v)]
    return args


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from dataset import make_demo_data
    return make_demo_data(tmp_path_factory.mktemp("demo"), n_train=6, n_test=3, size_range=(64, 96), seed=1)


@pytest.fixture
def sample_dir(tmp_path):
    """DATA_DIR holding the real course sample as train/course-sample."""
    assert SAMPLE.is_dir(), f"the real course sample is part of the repo: {SAMPLE} is missing"
    shutil.copytree(SAMPLE, tmp_path / "train" / "course-sample")
    return tmp_path


class InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf
