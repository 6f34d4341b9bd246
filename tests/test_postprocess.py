"""The box-region paste + RLE equals torchvision's full-size paste + pycocotools encode, pixel for pixel."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from utils import decode_mask
import predict


def stock_results(output, image_size, threshold):
    """torchvision's path: paste every mask into a full-size canvas, threshold, encode the full mask."""
    masks = paste_masks_in_image(output["mask_probs"], output["boxes"], image_size)[:, 0] > threshold
    rles = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
    return [r["counts"].decode("ascii") for r in rles], masks.numpy()


def random_output(rng, n, h, w):
    x0 = rng.uniform(-8, w + 2, n)
    y0 = rng.uniform(-8, h + 2, n)
    bw = np.where(rng.random(n) < 0.2, rng.uniform(0.05, 0.9, n), rng.uniform(1, 40, n))  # some under 1 px
    bh = np.where(rng.random(n) < 0.2, rng.uniform(0.05, 0.9, n), rng.uniform(1, 40, n))
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)  # torchvision clips boxes to the image ...
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)  # ... the 1-px mask padding still crosses the border
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.rand(n),
            "labels": torch.randint(1, 5, (n,)), "mask_probs": torch.rand(n, 1, 28, 28)}


@pytest.mark.parametrize("h, w, threshold", [(33, 35, 0.5), (97, 64, 0.3), (120, 150, 0.8), (40, 40, 0.0)])
def test_fast_path_equals_stock_path(h, w, threshold):
    rng = np.random.default_rng(h * w)
    out = random_output(rng, 150, h, w)
    # full-height and full-image boxes: runs that continue from one column into the next
    out["boxes"][:2] = torch.tensor([[0.0, 0.0, w, h], [3.0, 0.0, 9.0, h]])
    out["mask_probs"][:2] = 0.99
    ours = predict.image_records(out, 7, threshold, (h, w))
    counts, masks = stock_results(out, (h, w), threshold)
    kept = masks.any((1, 2))  # the stock path also writes detections whose mask is empty; ours drops them
    counts, masks = [c for c, k in zip(counts, kept) if k], masks[kept]
    assert [r["segmentation"]["counts"] for r in ours] == counts
    for r, m in zip(ours, masks):
        assert r["segmentation"]["size"] == [h, w]
        assert (decode_mask(r["segmentation"]) == m).all()


def test_detections_whose_mask_is_empty_are_dropped():
    out = {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0], [20.0, 5.0, 30.0, 15.0], [5.0, 20.0, 15.0, 30.0]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 3]),
           "mask_probs": torch.full((3, 1, 28, 28), 0.9)}
    out["mask_probs"][1] = 0.2  # nothing above the threshold: a sure false positive
    records = predict.image_records(out, 1, 0.5, (40, 40))
    assert [r["category_id"] for r in records] == [1, 3]
    assert all(decode_mask(r["segmentation"]).any() for r in records)
    assert len(predict.image_records(out, 1, 0.1, (40, 40))) == 3


def test_region_rle_edge_cases():
    for region, y0, x0, h, w in [(np.ones((3, 3), bool), 0, 0, 3, 3), (np.zeros((2, 2), bool), 1, 1, 4, 4),
                                 (np.ones((1, 1), bool), 4, 6, 5, 7), (np.zeros((0, 0), bool), 0, 0, 5, 5)]:
        full = np.zeros((h, w), np.uint8)
        full[y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
        rle = predict.region_rle(region, y0, x0, h, w)
        assert rle["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"].decode("ascii")


def test_lean_mask_targets_equal_torchvision():
    from torchvision.models.detection.roi_heads import project_masks_on_boxes as stock_project

    import losses
    rng = np.random.default_rng(0)
    gt = torch.from_numpy((rng.random((5, 60, 70)) > 0.5).astype(np.uint8))
    x0, y0 = rng.uniform(-3, 65, 40), rng.uniform(-3, 55, 40)
    boxes = torch.tensor(np.stack([x0, y0, x0 + rng.uniform(0.3, 30, 40), y0 + rng.uniform(0.3, 30, 40)], 1),
                         dtype=torch.float32)
    idx = torch.from_numpy(rng.integers(0, 5, 40))
    assert torch.allclose(losses.project_masks_on_boxes(gt, boxes, idx, 28), stock_project(gt, boxes, idx, 28), atol=2e-5)  # float rounding of the shifted boxes
