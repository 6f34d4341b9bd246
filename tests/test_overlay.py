"""Overlays a person can read (masks filled in their class colour, scores, ground truth beside) and the val
images that cost the most AP50."""
import cv2
import numpy as np
import pytest

import evaluate
import overlay
import utils
from dataset import CellDataset, TestDataset, list_train_ids


def record(mask, label, score, image_id):
    ys, xs = np.nonzero(mask)
    return {"image_id": image_id, "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                           float(ys.max() - ys.min() + 1)],
            "score": score, "category_id": label, "segmentation": utils.encode_mask(mask)}


def read_png(path, shape):
    png = cv2.imread(str(path))[..., ::-1]
    zoom = png.shape[1] // shape[1]
    return png[::zoom, ::zoom], zoom


def test_overlay_fills_each_class_in_its_colour_with_its_score(demo_dir, tmp_path):
    data = TestDataset(demo_dir)
    image, rec = data[0]
    h, w = image.shape[-2:]
    square = np.zeros((h, w), np.uint8)
    square[10:40, 8:38] = 1
    other = np.zeros((h, w), np.uint8)
    other[40:62, 42:62] = 1
    results = [record(square, 1, 0.9, rec["id"]), record(other, 3, 0.3, rec["id"]),
               record(other, 4, 0.9, rec["id"] + 1)]  # another image's: not drawn here
    rgb = overlay.to_rgb(image).astype(float)
    for min_score, drawn_other in [(0.5, False), (0.2, True)]:
        [path] = overlay.write_overlays(data, results, tmp_path / str(min_score), [0], min_score)
        assert path.name == rec["file_name"].replace(".tif", ".png")
        png, zoom = read_png(path, (h, w))
        assert zoom * max(h, w) >= overlay.MIN_SIDE
        panel = png[overlay.TITLE_HEIGHT:].astype(float)  # below the title strip
        assert panel.shape[:2] == (h, w)
        inner = np.zeros((h, w), bool)
        inner[25:38, 20:36] = True  # inside the square, away from its outline and its score's label
        blend = (1 - overlay.FILL_ALPHA) * rgb[inner] + overlay.FILL_ALPHA * np.array(overlay.CLASS_COLOURS[1])
        assert np.abs(panel[inner] - blend).max() <= 2  # filled in class 1's colour
        assert (panel[39, 12:34] == overlay.CLASS_COLOURS[1]).all()  # its outline, the class colour itself
        label = panel[8:22, 6:30]  # the score's label at the box's top-left: class colour behind white text
        assert (label == overlay.CLASS_COLOURS[1]).all(-1).sum() > 20 and (label.min(-1) > 180).sum() > 10  # text
        centre = panel[55:59, 48:56]
        tinted = overlay.FILL_ALPHA * np.array(overlay.CLASS_COLOURS[3]) + (1 - overlay.FILL_ALPHA) * rgb[55:59, 48:56]
        assert np.allclose(centre, tinted, atol=2) == drawn_other  # class 3 (0.3) only from score 0.2
        untouched = np.ones((h, w), bool)
        untouched[5:45, 3:43] = untouched[38:, 40:] = False
        assert np.abs(panel[untouched] - rgb[untouched]).max() <= 1


def test_a_val_overlay_shows_the_ground_truth_beside_the_predictions(demo_dir, tmp_path):
    data = CellDataset(demo_dir, list_train_ids(demo_dir)[:1], train=False)
    image, target = data[0]
    h, w = image.shape[-2:]
    [path] = overlay.write_overlays(data, [], tmp_path, [0], 0.05, notes={0: "missed 3"})
    png, _ = read_png(path, (h, 2 * w + 4))
    assert png.shape[:2] == (h + overlay.TITLE_HEIGHT, 2 * w + 4)
    truth, pred = png[overlay.TITLE_HEIGHT:, :w].astype(float), png[overlay.TITLE_HEIGHT:, w + 4:].astype(float)
    rgb = overlay.to_rgb(image).astype(float)
    assert np.abs(pred - rgb).max() <= 1  # no prediction: the image itself
    masks = target["masks"].numpy()
    edges = np.any([m & ~cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
                    for m in masks], 0).astype(bool)
    for mask, label in zip(masks.astype(bool), target["labels"].tolist()):
        inner = mask & ~edges & (masks.sum(0) == 1)  # its own pixels, off every outline
        expected = (1 - overlay.FILL_ALPHA) * rgb[inner] + overlay.FILL_ALPHA * np.array(overlay.CLASS_COLOURS[label])
        assert np.abs(truth[inner] - expected).max() <= 2 or not inner.any()
    assert (truth[edges] != rgb[edges]).any(-1).all()  # every cell outlined


def cells(h, w, boxes):
    masks = np.zeros((len(boxes), h, w), np.uint8)
    for m, (y, x) in zip(masks, boxes):
        m[y:y + 10, x:x + 10] = 1
    return masks


def test_image_costs_rank_the_images_that_lose_the_most_ap50():
    """Image 0 perfectly predicted; image 1: 2 of its 4 class-1 cells missed, one confident false cell of class 2,
    and a false class-1 cell below the score the counts use. Its cost is the AP50 over image 0 alone minus over
    both, as pycocotools scores the subset."""
    corners = [(5, 5), (5, 30), (30, 5), (30, 30)]
    gt = evaluate.coco_ground_truth([{"id": i, "height": 60, "width": 60, "masks": cells(60, 60, corners),
                                      "labels": np.array([1, 1, 1, 2])} for i in (0, 1)])
    masks = cells(60, 60, corners + [(45, 45), (45, 5)])
    results = [record(masks[j], k, 0.9, 0) for j, k in enumerate([1, 1, 1, 2])]
    results += [record(masks[0], 1, 0.9, 1), record(masks[3], 2, 0.8, 1), record(masks[4], 2, 0.95, 1),
                record(masks[5], 1, 0.2, 1)]
    costs = evaluate.image_costs(gt, results, min_score=0.5)
    assert [c["image_id"] for c in costs] == [1, 0]
    assert costs[0]["missed"] == {1: 2} and costs[0]["false"] == {2: 1}  # the 0.2 one is under min_score
    assert costs[1]["missed"] == {} and costs[1]["false"] == {}
    both = evaluate.coco_evaluate(gt, results)["ap50"]
    assert costs[0]["cost"] == pytest.approx(evaluate.coco_evaluate(gt, results, img_ids=[0])["ap50"] - both)
    assert costs[1]["cost"] == pytest.approx(evaluate.coco_evaluate(gt, results, img_ids=[1])["ap50"] - both)
    assert costs[0]["cost"] > 0 >= costs[1]["cost"]
