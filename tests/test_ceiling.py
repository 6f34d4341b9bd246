"""The AP50 ceiling that maxDets 100 per image and class leaves: evaluate.ceiling against pycocotools run on a
perfect submission of the same ground truth (they must agree), on the real HW3 validation geometry."""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

import evaluate
from bench import hw3real
from utils import NUM_CLASSES


def coco_of(dataset):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def perfect_submission(coco_gt, img_ids):
    """Every ground-truth cell as a detection of its class, its own mask, score 1."""
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_ids))
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in anns]


@pytest.fixture(scope="module")
def real_gt():
    return coco_of(hw3real.load_geometry())


def test_the_ceiling_is_what_pycocotools_gives_a_perfect_submission(real_gt):
    counts = {i: len(real_gt.getAnnIds(imgIds=[i])) for i in real_gt.getImgIds()}
    # two images just past 100 cells of a class (pycocotools' matching is a Python loop over cells x
    # detections: the 772-cell image would take minutes) and a few small ones
    over = [i for i in sorted(counts, key=counts.get) if any(
        len(real_gt.getAnnIds(imgIds=[i], catIds=[k])) > 100 for k in range(1, NUM_CLASSES + 1))]
    img_ids = over[:2] + sorted(counts, key=counts.get)[:4]
    limit = evaluate.ceiling(real_gt, img_ids=img_ids)
    assert limit["capped"] and limit["ap50"] < 1  # the cap bites in these images
    scored = evaluate.coco_evaluate(real_gt, perfect_submission(real_gt, img_ids), max_dets=100, img_ids=img_ids)
    assert scored["ap50"] == pytest.approx(limit["ap50"], abs=1e-12)
    for k, c in limit["per_class"].items():
        assert scored["per_class_ap50"][k] == pytest.approx(c["ap50"], abs=1e-12), k
    # at maxDets 1000 nothing is capped (772 cells at most): the ceiling is 1
    assert evaluate.ceiling(real_gt, max_dets=1000)["ap50"] == 1.0


def test_the_ceiling_of_the_50_real_validation_images(real_gt):
    """The figure the leaderboard's best entries should be read against: 0.693, classes 1 and 2 capped."""
    limit = evaluate.ceiling(real_gt)
    assert limit["ap50"] == pytest.approx(0.693, abs=5e-4)
    assert limit["per_class"][1]["recall"] == pytest.approx(0.452, abs=1e-3)
    assert limit["per_class"][2]["recall"] == pytest.approx(0.310, abs=1e-3)
    assert limit["per_class"][3]["recall"] == limit["per_class"][4]["recall"] == 1.0
    line = evaluate.format_ceiling(limit, ap50=0.6394)
    assert "0.693" in line and "class 1 recall <= 0.45" in line and "92% of it" in line


def test_a_small_case_by_hand():
    """One image: 150 cells of class 2, 10 of class 1. Class 2 can reach 100/150 recall: 67 of the 101
    recall thresholds (0.00 .. 0.66); class 1 all of them."""
    masks, labels = [], []
    for n, k in ((150, 2), (10, 1)):
        for i in range(n):
            m = np.zeros((40, 200), np.uint8)
            m[(i % 10) * 4:(i % 10) * 4 + 3, (i // 10) * 12 + 6 * (k == 1):(i // 10) * 12 + 5 + 6 * (k == 1)] = 1
            masks.append(m)
            labels.append(k)
    gt = evaluate.coco_ground_truth([{"id": 1, "height": 40, "width": 200, "masks": masks, "labels": labels}])
    limit = evaluate.ceiling(gt)
    assert set(limit["per_class"]) == {1, 2} and limit["capped"] == [(1, 2, 150)]
    assert limit["per_class"][2]["ap50"] == pytest.approx(67 / 101) and limit["per_class"][1]["ap50"] == 1.0
    assert limit["ap50"] == pytest.approx((1 + 67 / 101) / 2)
    assert evaluate.coco_evaluate(gt, perfect_submission(gt, [1]))["ap50"] == pytest.approx(limit["ap50"])
    assert NUM_CLASSES == 4
