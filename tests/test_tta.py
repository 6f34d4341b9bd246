"""Tiles stitched without duplicates at the seams, TTA passes fused without duplicates."""
import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision.ops import box_iou, roi_align

import infer
import predict
from bench.tiled_inference import one_pass_tiled
from conftest import TINY
from model import build_model, set_thresholds


class BlobDetector(torch.nn.Module):
    """Stand-in for a trained model: one detection per bright blob (class from the green channel, score
    from the area), its 28x28 mask probabilities cut from the blob itself. Exact, and equivariant to flips,
    so what tiling and TTA add or lose shows."""

    def forward(self, images):
        outs = []
        for im in images:
            fg = (im[0] > 0.5).numpy()
            lab, n = ndimage.label(fg)
            slices = ndimage.find_objects(lab)
            boxes = torch.tensor([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices],
                                 dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor([1 + int(im[1][s].max() * 3.99) for s in slices], dtype=torch.int64)
            probs = roi_align(torch.from_numpy(fg.astype(np.float32))[None, None], [boxes], 28, 1.0, 2, aligned=True)
            scores = torch.tensor([0.5 + 0.4 * min((lab[s] > 0).sum() / 900, 1.0) for s in slices]).reshape(-1)
            outs.append({"boxes": boxes, "scores": scores.float(), "labels": labels, "mask_probs": probs})
        return outs

    def detect(self, images):  # model.CellMaskRCNN's two steps, which tiled prediction calls
        return [{k: v for k, v in out.items() if k != "mask_probs"} for out in self(images)], images

    def segment(self, images, detections):
        return [dict(d, mask_probs=roi_align((im[0] > 0.5).float()[None, None], [d["boxes"]], 28, 1.0, 2, aligned=True))
                for im, d in zip(images, detections)]


def blob_image(rng, h, w, n, symmetric=False):
    """L-shaped and square blobs (up to 30 px, 3 px apart at least), mirrored in both axes if symmetric."""
    image = torch.zeros(3, h, w)
    taken = np.zeros((h, w), bool)
    for _ in range(n):
        s = int(rng.integers(6, 30))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        if symmetric:
            y, x = int(rng.integers(0, h // 2 - s)), int(rng.integers(0, w // 2 - s))
        if taken[max(y - 3, 0):y + s + 3, max(x - 3, 0):x + s + 3].any():
            continue
        taken[y:y + s, x:x + s] = True
        image[0, y:y + s, x:x + s] = 1.0
        image[0, y + s // 2:y + s, x + s // 2:x + s] = 0.0  # an L: its mask is not flip-symmetric
        image[1, y:y + s, x:x + s] = float(rng.integers(0, 4)) / 4
    if symmetric:
        image = torch.maximum(image, image.flip(-1))
        image = torch.maximum(image, image.flip(-2))
    return image


def opts(max_size=4096, **kw):
    """predict_options of a run at a fixed x1 scale; kw: infer.py's prediction settings in lower case (tta=...)."""
    settings = infer.prediction_settings(**{k.upper(): v for k, v in kw.items()})
    return predict.predict_options({"MIN_SIZE": 0, "MAX_SIZE": max_size, "SCALE": 1.0}, settings)


def as_set(out):
    return sorted(tuple(b) + (int(label),) for b, label in zip(out["boxes"].round().tolist(), out["labels"]))


def no_duplicates(out, iou_threshold=0.5):
    iou = box_iou(out["boxes"], out["boxes"])
    same = out["labels"][:, None] == out["labels"][None]
    return not ((iou > iou_threshold) & same & ~torch.eye(len(iou), dtype=torch.bool)).any()


@pytest.mark.parametrize("length, tile, overlap", [(100, 100, 20), (101, 100, 20), (1000, 128, 48), (2500, 666, 128)])
def test_tiles_cover_and_overlap(length, tile, overlap):
    starts = predict.tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    cores = predict.tile_cores(starts, tile)
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(cores, cores[1:]))  # every pixel owned exactly once


def test_tiled_prediction_equals_whole_image_without_seam_duplicates():
    rng = np.random.default_rng(0)
    image = blob_image(rng, 300, 260, 120)
    model = BlobDetector()
    whole = predict.predict_image(model, image, opts(tile=False))
    tiled = predict.predict_image(model, image, opts(max_size=96, tile_overlap=40))
    assert len(predict.tile_starts(300, 96, 40)) > 3  # really tiled
    assert as_set(tiled) == as_set(whole) and no_duplicates(tiled)
    untiled_small = predict.predict_image(model, image, opts(max_size=96, tile=False))  # shrunk to fit instead
    assert len(untiled_small["boxes"]) > 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_flip_tta_merges_without_duplicates(symmetric):
    rng = np.random.default_rng(1)
    image = blob_image(rng, 120, 160, 30, symmetric=symmetric)
    model = BlobDetector()
    single = predict.predict_members([(model, opts())], image)
    fused = predict.predict_members([(model, opts(tta="flips"))], image)
    assert len(single["boxes"]) >= 8
    assert as_set(fused) == as_set(single) and no_duplicates(fused)
    by_box = {tuple(b): p for b, p in zip(single["boxes"].tolist(), single["mask_probs"])}
    for box, prob, score in zip(fused["boxes"].tolist(), fused["mask_probs"], fused["scores"]):
        match = min(by_box, key=lambda b: sum(abs(u - v) for u, v in zip(b, box)))
        assert torch.allclose(prob, by_box[match], atol=1e-4)  # the same cell's (un-flipped) mask
    assert sorted(fused["scores"].tolist()) == pytest.approx(sorted(single["scores"].tolist()))


def test_scale_tta_runs_and_stays_duplicate_free():
    image = blob_image(np.random.default_rng(2), 120, 160, 30)
    fused = predict.predict_members([(BlobDetector(), opts(tta="flips+scales", tta_scales=[0.8, 1.25]))], image)
    assert len(fused["boxes"]) >= 8 and no_duplicates(fused)
    with pytest.raises(ValueError, match="choose none, flips or flips"):
        opts(tta="rotations")


def test_fusion_weighs_passes_and_averages_masks():
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    a = {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2]), "mask_probs": torch.ones(1, 1, 28, 28)}
    b = {**a, "boxes": box + 1.0, "scores": torch.tensor([0.3]), "mask_probs": torch.zeros(1, 1, 28, 28)}
    lone = {**a, "boxes": torch.tensor([[50.0, 50.0, 60.0, 60.0]]), "scores": torch.tensor([0.6])}
    empty = {k: v[:0] for k, v in a.items()}
    fused = predict.fuse_detections([a, b, lone], iou_threshold=0.5, detections_per_image=100, class_reserve=100)
    assert fused["scores"].tolist() == pytest.approx([0.4, 0.2])  # (0.9 + 0.3) / 3, and 0.6 / 3
    assert torch.allclose(fused["boxes"][0], box[0] + 0.25)  # score-weighted mean box
    centre = fused["mask_probs"][0, 0, 4:24, 4:24]
    assert torch.allclose(centre, torch.full_like(centre, 0.75), atol=1e-5)  # score-weighted mean mask
    same_class_elsewhere = {**b, "labels": torch.tensor([3])}
    assert len(predict.fuse_detections([a, same_class_elsewhere], 0.5, 100, 100)["boxes"]) == 2  # classes never merge
    assert len(predict.fuse_detections([empty, empty], 0.5, 100, 100)["boxes"]) == 0


def test_resample_masks_is_identity_in_the_same_box():
    probs = torch.rand(5, 28, 28)
    boxes = torch.tensor([[0.0, 0, 10, 20], [3, 4, 50, 9], [1, 1, 2, 2], [0, 0, 28, 28], [5, 5, 6, 40]])
    assert torch.allclose(predict.resample_masks(probs, boxes, boxes), probs, atol=1e-5)


@pytest.mark.parametrize("factor", [1.0, 1.5, 0.75])
def test_tiles_take_boxes_first_and_masks_last_with_the_masks_of_one_pass(factor):
    """predict_tiled runs the mask head only on the detections kept for the whole image; its detections and
    masks are those of the one-pass way (the model's forward on every tile: masks for each tile's 40), also
    where tiles are resized (the mask head takes boxes in the tile input's pixels, the output is in the image's)."""
    torch.manual_seed(0)
    settings = infer.prediction_settings(DETECTIONS_PER_IMAGE=40, SCORE_THRESHOLD=0.0)
    model = set_thresholds(build_model(TINY), settings).eval()
    masked = []  # RoIs through the mask head
    model.roi_heads.mask_head.register_forward_hook(lambda module, inputs, output: masked.append(len(output)))
    image, tile, overlap = torch.rand(3, 150, 200), 96, 32
    assert len(predict.tile_starts(150, tile, overlap)) * len(predict.tile_starts(200, tile, overlap)) == 6
    with torch.no_grad():
        ours = predict.predict_tiled(model, image, factor, tile, overlap, 0.5, detections_per_image=40, class_reserve=100)
        assert sum(masked) == len(ours["boxes"]) == 40  # the mask head on the 40 kept ...
        masked.clear()
        one = one_pass_tiled(model, image, factor, tile, overlap, 0.5, detections_per_image=40, class_reserve=100)
    assert sum(masked) > 40 * 4  # ... where one pass runs it on every tile's 40
    for k in predict.FIELDS:
        assert torch.allclose(ours[k].float(), one[k].float(), atol=1e-5), k


def test_tiles_without_a_detection_give_none():
    out = predict.predict_tiled(BlobDetector(), torch.zeros(3, 200, 200), 1.0, 96, 32, 0.5, detections_per_image=40, class_reserve=100)
    assert len(out["boxes"]) == 0 and out["mask_probs"].shape == (0, 1, 28, 28)
