"""One sizing rule for training, validation and inference; masks made only at the model's input size, as uint8."""
import tracemalloc

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from conftest import TINY, write_sample
from dataset import CellDataset, instances_from_labels, resize_factor, resize_image, resize_labels
from model import build_model


def random_labels(rng, h, w, n, size=(3, 9)):
    labels = np.zeros((h, w, 4), np.float32)
    for i in range(1, n + 1):
        r = rng.integers(*size)
        y, x, k = rng.integers(0, h - r), rng.integers(0, w - r), rng.integers(0, 4)
        labels[y:y + r, x:x + rng.integers(*size), k] = i
    return labels


def test_resize_factor_rule():
    assert resize_factor(400, 600, 800, 1333) == pytest.approx(2.0)              # shorter side -> MIN_SIZE
    assert resize_factor(1000, 3000, 800, 1333) == pytest.approx(1333 / 3000)    # longer side capped
    assert resize_factor(33, 86, 800, 1333, scale=2.0) == 2.0                    # fixed scale: cells keep their size
    assert resize_factor(2500, 1987, 800, 1333, scale=2.0) == pytest.approx(1333 / 2500)
    assert resize_factor(2500, 1987, 800, 1333, scale=2.0, cap=False) == 2.0    # what tiling works from


@pytest.mark.parametrize("h, w", [(45, 61), (300, 170)])  # up- and down-scaled
def test_masks_from_resized_label_maps_equal_torchvision_resize(h, w):
    rng = np.random.default_rng(h)
    labels = random_labels(rng, h, w, 40)
    image = torch.rand(3, h, w)
    masks, classes, boxes = instances_from_labels(labels)
    stock = GeneralizedRCNNTransform(96, 160, [0.0] * 3, [1.0] * 3)
    _, stock_targets = stock.resize(image, {"boxes": torch.from_numpy(boxes), "masks": torch.from_numpy(masks)})
    factor = resize_factor(h, w, 96, 160)
    resized = resize_image(image, factor)
    stock_image, _ = stock.resize(image)
    assert resized.shape == stock_image.shape and torch.allclose(resized, stock_image)
    ours, ours_classes, _ = instances_from_labels(resize_labels(labels, resized.shape[-2:]))
    expected = stock_targets["masks"].numpy()
    kept = expected.reshape(len(expected), -1).any(1)  # cells that shrink to nothing are gone from both
    assert ours.dtype == np.uint8 and np.array_equal(ours, expected[kept]) and np.array_equal(ours_classes, classes[kept])


def test_model_does_not_resize_its_input():
    model = build_model(TINY).eval()
    batch, _ = model.transform([torch.rand(3, 50, 70)])
    assert batch.image_sizes == [(50, 70)]


def test_fixed_scale_crops_training_images_and_shrinks_validation_ones(tmp_path):
    rng = np.random.default_rng(0)
    labels = random_labels(rng, 300, 200, 60)
    write_sample(tmp_path, image=rng.integers(0, 255, (300, 200, 3), dtype=np.uint8),
                 classes={k + 1: labels[..., k] for k in range(4) if labels[..., k].any()})
    sizing = (96, 160, 2.0)
    torch.manual_seed(0)
    crops = [CellDataset(tmp_path, ["s1"], train=True, sizing=sizing)[0] for _ in range(3)]
    for image, target in crops:  # random 80 x 80 windows (160 / 2), upscaled x2
        assert image.shape == (3, 160, 160) and target["masks"].shape[1:] == (160, 160)
    assert not torch.equal(crops[0][0], crops[1][0]) or not torch.equal(crops[1][0], crops[2][0])
    image, target = CellDataset(tmp_path, ["s1"], train=False, sizing=sizing)[0]
    assert image.shape == (3, 160, 106)  # whole image, longer side capped at MAX_SIZE
    image, target = CellDataset(tmp_path, ["s1"], train=False)[0]
    assert image.shape == (3, 300, 200)  # no sizing: the image's own size (scored as at test time)


def test_772_instance_image_masks_stay_uint8_and_under_1gb(tmp_path):
    """The largest training image (1731 x 2162) with 772 cells, at the recipe's input size (800 x 999):
    the masks are made once, as uint8, at the input size; the model keeps them as they are."""
    h, w, n = 1731, 2162, 772
    labels = np.zeros((h, w), np.float32)
    side = 40
    for i in range(n):
        y, x = divmod(i, w // (side + 10))
        labels[y * (side + 10):y * (side + 10) + side, x * (side + 10):x * (side + 10) + side] = i + 1
    write_sample(tmp_path, "big", image=np.full((h, w, 3), 128, np.uint8), classes={2: labels})
    # no augmentation: a free rotation could turn cells out of the image (the sizing path is the same)
    dataset = CellDataset(tmp_path, ["big"], train=False, sizing=(800, 1333, 0.0))
    tracemalloc.start()
    image, target = dataset[0]
    _, peak = tracemalloc.get_traced_memory()  # numpy's allocations (the masks are numpy-made)
    tracemalloc.stop()
    masks = target["masks"]
    assert image.shape[-2:] == (800, 999) and masks.shape == (n, 800, 999) and masks.dtype == torch.uint8
    assert masks.numel() < 1e9 and peak < 1e9, f"peak {peak / 1e9:.2f} GB"
    model = build_model(TINY)
    _, targets = model.transform([image], [target])
    assert targets[0]["masks"].dtype == torch.uint8 and targets[0]["masks"].data_ptr() == masks.data_ptr()



@pytest.mark.parametrize("low_quality", [True, False])
def test_chunked_anchor_matching_equals_torchvision(low_quality):
    from torchvision.models.detection._utils import Matcher
    from torchvision.ops import box_iou

    from model import BoxPair, ChunkedMatcher
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3000, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + torch.rand(3000, 2, generator=g) * 40 + 1], 1)
    anchors = torch.cat([anchors, anchors[:50]])  # duplicate anchors: ties for the low-quality matches
    gt = anchors[torch.randperm(len(anchors), generator=g)[:70]] + torch.rand(70, 4, generator=g) * 3
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    stock = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    ours = ChunkedMatcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    ours.block = 70 * 257  # many blocks, the last one short
    expected = stock(box_iou(gt, anchors))
    assert (expected >= 0).sum() > 20 and torch.equal(ours(BoxPair(gt, anchors)), expected)


def test_the_model_matches_anchors_in_blocks():
    from model import ChunkedMatcher
    model = build_model(TINY)
    assert isinstance(model.rpn.proposal_matcher, ChunkedMatcher) and model.rpn.proposal_matcher.allow_low_quality_matches
