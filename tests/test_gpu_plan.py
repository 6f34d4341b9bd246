"""bench.gpu_plan: FLOP counts grow with the input, tiles come from predict.tiling, the measure path runs on the
CPU, and the calibration arithmetic (estimate = FLOPs / effective throughput) is right. Tiny model, nothing downloads."""
import types

import pytest
import torch

from bench import gpu_plan
from conftest import TINY
from losses import preset_weights
from model import build_model

TINY_PLAN = dict(BACKBONE=TINY["BACKBONE"], FPN_CHANNELS=TINY["FPN_CHANNELS"], ROI_BATCH_SIZE=16,  # 4 mask RoIs at most: fast
                 MIN_SIZE=TINY["MIN_SIZE"], MAX_SIZE=TINY["MAX_SIZE"])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(gpu_plan.recipe_cfg(0.0, "standard", **TINY_PLAN), load_pretrained=False)


def test_detect_flops_positive_and_grow_with_input(tiny_model):
    small = gpu_plan.detect_flops(tiny_model, (64, 64))
    large = gpu_plan.detect_flops(tiny_model, (128, 128))
    assert 0 < small < large


def test_train_step_flops_grow_with_input(tiny_model):
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    target["masks"][0, 10:30, 10:30] = 1
    weights = preset_weights("stock")
    small, rois = gpu_plan.train_step_flops(tiny_model, torch.rand(3, 64, 64), target, weights)
    big_target = dict(target, masks=torch.nn.functional.pad(target["masks"], (0, 64, 0, 64)))
    large, _ = gpu_plan.train_step_flops(tiny_model, torch.rand(3, 128, 128), big_target, weights)
    assert 0 < small < large and rois >= 1


def test_tiles_come_from_predict_tiling():
    opts = {"sizing": (800, 1333, 2.0), "tile": True, "tile_overlap": 128}
    (tiles, shape), (one, whole) = gpu_plan.test_plan([(2500, 735), (300, 400)], opts)
    assert tiles >= 4 and max(shape) <= 1333  # a 2500 px image at SCALE 2: 666-px windows, several of them
    assert one == 1 and whole == (600, 800)


def test_calibration_arithmetic():
    cal = dict(gpu_plan.CALIBRATION, d2_train_s_per_iter=0.5, d2_images_per_iter_per_gpu=2, d2_infer_s_per_image=0.1,
               v100_fp32_img_s=100.0, t4_amp_img_s=50.0, t4_fp32_img_s=25.0)
    rates = gpu_plan.t4_rates(train_flops_per_image=1e12, infer_flops_per_image=1e11, cal=cal)
    assert rates["v100_train"] == pytest.approx(1e12 / 0.25)  # 2 images in 0.5 s
    assert rates["train"] == pytest.approx(4e12 * 0.5)
    assert rates["infer"] == pytest.approx(1e12 * 0.25)
    assert gpu_plan.estimate_seconds(6e12, rates["train"]) == pytest.approx(3.0)
    row = gpu_plan.plan_row("x", step_s=3.0, test_s_per_image=1.0, n_test=3600, n_train=100, n_val=20)
    assert row["epoch_min"] == pytest.approx((300 + 20) / 60) and row["test_h"] == pytest.approx(1.0)
    assert row["session_epochs"] == int(11 * 60 // ((300 + 20) / 60))


def test_measure_path_runs_on_cpu(tmp_path):
    names = gpu_plan.write_samples(tmp_path, [(60, 80, 4), (90, 120, 9)])
    cfg = gpu_plan.recipe_cfg(2.0, "standard", **TINY_PLAN)
    args = types.SimpleNamespace(device="cpu", amp="off", fg_per_object=2, buckets=1, warmup=0, steps=1,
                                 prediction={"DETECTIONS_PER_IMAGE": 20, "RPN_PROPOSALS": 100})
    m = gpu_plan.measure_config("tiny", cfg, str(tmp_path), names, [(50, 70), (200, 90)], args, log=lambda s: None)
    assert m["step_s"] > 0 and m["test_s_per_image"] > 0 and len(m["reps"]) == 1
