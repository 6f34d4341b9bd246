import numpy as np
import pytest

import train
from evaluate import coco_evaluate, coco_ground_truth
from utils import apply_overrides, decode_mask, encode_mask


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 33)])
def test_rle_round_trip(shape):
    rng = np.random.default_rng(0)
    for mask in (rng.random(shape) > 0.5, np.zeros(shape, bool), np.ones(shape, bool)):
        rle = encode_mask(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(shape)
        assert (decode_mask(rle) == mask).all()


def test_cli_overrides_change_constants_with_their_types():
    ns = {"EPOCHS": 50, "LR": 5e-5, "PRETRAINED": True, "BACKBONE": "x", "LOSS_WEIGHTS": {}, "RESUME": False}
    cfg, given = apply_overrides(ns, ["--epochs", "3", "--lr", "1e-3", "--pretrained", "false",
                                      "--backbone", "resnet18", "--loss-weights", '{"loss_mask": 2}', "--resume"])
    assert cfg == {"EPOCHS": 3, "LR": 1e-3, "PRETRAINED": False, "BACKBONE": "resnet18",
                   "LOSS_WEIGHTS": {"loss_mask": 2}, "RESUME": True}
    assert given == set(cfg)
    with pytest.raises(SystemExit):
        apply_overrides(dict(ns), ["--epochs", "three"])
    with pytest.raises(SystemExit):
        apply_overrides(dict(ns), ["--no-such-constant", "1"])


def test_train_constants_overridable_and_demo_preset_yields_to_the_command_line():
    cfg, _ = train.resolve_config(["--epochs", "3", "--backbone", "resnet18", "--pretrained", "false"])
    assert (cfg["EPOCHS"], cfg["BACKBONE"], cfg["PRETRAINED"]) == (3, "resnet18", False)
    assert train.EPOCHS == 50  # the module's defaults are untouched
    cfg, _ = train.resolve_config(["--demo", "true", "--epochs", "1"])
    assert cfg["EPOCHS"] == 1 and cfg["BACKBONE"] == train.DEMO_SETTINGS["BACKBONE"]


def test_coco_evaluate_perfect_and_empty():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:8, 3:9] = 1
    gt = coco_ground_truth([{"id": 0, "height": 20, "width": 20, "masks": [mask], "labels": [2]}])
    perfect = [{"image_id": 0, "category_id": 2, "score": 0.9, "bbox": [3, 2, 6, 6], "segmentation": encode_mask(mask)}]
    assert coco_evaluate(gt, perfect)["ap50"] == pytest.approx(1.0)
    wrong_class = [dict(perfect[0], category_id=1)]
    assert coco_evaluate(gt, wrong_class)["ap50"] == pytest.approx(0.0)
    assert coco_evaluate(gt, [])["ap50"] == 0.0


def test_matching_accuracy_counts_tp_fp_fn():
    from evaluate import matching_accuracy
    a = np.zeros((20, 20), np.uint8)
    a[2:8, 2:8] = 1
    b = np.zeros((20, 20), np.uint8)
    b[10:18, 10:18] = 1
    gt = coco_ground_truth([{"id": 0, "height": 20, "width": 20, "masks": [a, b], "labels": [1, 2]}])
    shifted = np.roll(a, 1, axis=1)  # IoU 30/42 > 0.5, other class: matching is class-agnostic
    far = np.zeros((20, 20), np.uint8)
    far[0:2, 15:20] = 1
    preds = [{"image_id": 0, "category_id": 3, "score": 0.9, "bbox": [0, 0, 1, 1], "segmentation": encode_mask(shifted)},
             {"image_id": 0, "category_id": 1, "score": 0.8, "bbox": [0, 0, 1, 1], "segmentation": encode_mask(a)},
             {"image_id": 0, "category_id": 1, "score": 0.7, "bbox": [0, 0, 1, 1], "segmentation": encode_mask(far)},
             {"image_id": 0, "category_id": 1, "score": 0.1, "bbox": [0, 0, 1, 1], "segmentation": encode_mask(b)}]
    m = matching_accuracy(gt, preds)
    # shifted matches a; the exact copy of a is a duplicate (FP); far is FP; b's only match scores < 0.5 (FN)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1) and m["accuracy"] == pytest.approx(1 / 4)
