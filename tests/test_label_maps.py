"""Label maps of any images (infer.py --images DIR --label-maps OUT): per-class uint16 instance maps in the training
layout and cells.csv (labelmaps.py), and the folder of images they are predicted from (dataset.ImageFolder)."""
import csv
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import tifffile
import torch

import infer
import labelmaps
import predict
from conftest import TINY
from dataset import (CellDataset, DataError, ImageFolder, TestDataset, instances_from_labels, list_train_ids,
                     read_label_maps, synth_image)
from model import build_model, set_thresholds
from utils import CHECKPOINT_FORMAT, NUM_CLASSES

SETTINGS = infer.prediction_settings(SCORE_THRESHOLD=0.0, DETECTIONS_PER_IMAGE=20)  # an untrained model finds some


def detections(boxes, scores, labels, probs=None):
    """A detections dict as predict_dataset gives it; masks all ones (the whole box) unless given."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    probs = torch.ones(len(boxes), 1, 28, 28) if probs is None else probs
    return {"boxes": boxes, "scores": torch.as_tensor(scores, dtype=torch.float32),
            "labels": torch.as_tensor(labels, dtype=torch.int64), "mask_probs": probs}


def pasted(out, size, threshold=0.5):
    """{detection index: full-size bool mask} of pasted_masks."""
    full = {}
    for i, region, y0, x0 in predict.pasted_masks(out, size, threshold):
        full[i] = np.zeros(size, bool)
        full[i][y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
    return full


def box_probs(mask, box):
    """A 1x28x28 mask-head output of a ground-truth mask: its box's crop resized."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return torch.from_numpy(cv2.resize(mask[y0:y1, x0:x1].astype(np.float32), (28, 28)))[None]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_label_maps_read_back_by_the_training_reader_give_the_detections(demo_dir, tmp_path):
    image, target = CellDataset(demo_dir, list_train_ids(demo_dir)[:1])[0]
    size = tuple(image.shape[-2:])
    probs = torch.stack([box_probs(m, b) for m, b in zip(target["masks"].numpy(), target["boxes"].numpy())])
    out = detections(target["boxes"], torch.rand(len(probs), generator=torch.Generator().manual_seed(0)),
                     target["labels"], probs)
    masks = pasted(out, size)
    kept = []  # the detections whose pasted masks overlap no other kept one of their class
    for i, mask in masks.items():
        if not any((mask & masks[j]).any() for j in kept if out["labels"][j] == out["labels"][i]):
            kept.append(i)
    out = predict.subset_detections(out, torch.tensor(kept))
    expected = sorted((int(out["labels"][i]), m.tobytes()) for i, m in pasted(out, size).items())
    assert len(expected) >= 5
    table = SimpleNamespace(table=[{"id": 7, "file_name": "val.tif"}])
    counts, images, pixels = labelmaps.write_label_maps(table, [(7, size, out)], tmp_path, 0.5)
    assert (images, pixels) == (1, size[0] * size[1])
    assert all(tifffile.imread(tmp_path / "val" / f"class{k}.tif").dtype == np.uint16 for k in range(1, 5))
    masks, classes, boxes = instances_from_labels(read_label_maps(tmp_path / "val", size))
    assert sorted((int(k), m.astype(bool).tobytes()) for k, m in zip(classes, masks)) == expected
    rows = read_rows(tmp_path / "cells.csv")
    assert len(rows) == len(expected) == sum(counts) and {r["image"] for r in rows} == {"val.tif"}
    assert sorted((int(r["class"]), int(r["area"]), *(int(r[c]) for c in ("x0", "y0", "x1", "y1"))) for r in rows) \
        == sorted((int(k), int(m.sum()), *(int(v) for v in b)) for k, m, b in zip(classes, masks, boxes))


def test_the_higher_score_wins_an_overlap_and_ids_follow_the_scores(tmp_path):
    size = (60, 60)
    # in no order of score: C inside A, B across A's corner, D (class 2) over A, E apart and best
    boxes = {"C": [14, 14, 26, 26], "D": [5, 5, 25, 25], "B": [20, 20, 40, 40], "A": [10, 10, 30, 30],
             "E": [45, 45, 55, 55]}
    scores, labels = {"C": 0.5, "D": 0.3, "B": 0.8, "A": 0.9, "E": 0.95}, {"C": 1, "D": 2, "B": 1, "A": 1, "E": 1}
    names = list(boxes)
    out = detections([boxes[n] for n in names], [scores[n] for n in names], [labels[n] for n in names])
    mask = {names[i]: m for i, m in pasted(out, size).items()}
    assert (mask["C"] <= mask["A"]).all() and (mask["A"] & mask["B"]).any()
    maps, map_scores = labelmaps.label_maps(out, size, 0.5)
    ones, twos = maps[..., 0], maps[..., 1]
    assert maps.dtype == np.uint16 and maps.shape == (*size, NUM_CLASSES) and not maps[..., 2:].any()
    assert (ones[mask["E"]] == 1).all() and (ones[mask["A"]] == 2).all()  # A whole, over B and C
    assert ((ones == 3) == (mask["B"] & ~mask["A"])).all() and set(np.unique(ones)) == {0, 1, 2, 3}  # C: no id
    assert ((twos == 1) == mask["D"]).all()  # classes do not compete
    assert map_scores[0] == pytest.approx([0.95, 0.9, 0.8]) and map_scores[1] == pytest.approx([0.3])
    cut, cut_scores = labelmaps.label_maps(out, size, 0.5, min_score=0.4)  # LABEL_MAP_SCORE: D out
    assert np.array_equal(cut[..., 0], ones) and not cut[..., 1].any() and cut_scores[1] == []
    rows = labelmaps.instance_rows("x.png", maps, map_scores)
    assert [(r["class"], r["instance"], r["score"]) for r in rows] == [(1, 1, "0.9500"), (1, 2, "0.9000"),
                                                                       (1, 3, "0.8000"), (2, 1, "0.3000")]
    ys, xs = np.nonzero(ones == 3)
    b = rows[2]
    assert (b["area"], b["x0"], b["y0"], b["x1"], b["y1"]) == (len(ys), xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert (float(b["centroid_y"]), float(b["centroid_x"])) == pytest.approx((ys.mean(), xs.mean()), abs=0.005)


def test_a_detection_mostly_covered_by_a_better_one_gets_no_id():
    """F's mask is 81% under A's: it would leave a sliver, so it gets no id; G, 75% free, keeps its free part."""
    out = detections([[10, 10, 30, 30], [12, 12, 32, 32], [20, 0, 40, 20]], [0.9, 0.8, 0.7], [1, 1, 1])
    mask = pasted(out, (50, 50))
    maps, scores = labelmaps.label_maps(out, (50, 50), 0.5)
    assert scores[0] == pytest.approx([0.9, 0.7]) and (maps[..., 0][mask[0]] == 1).all()
    assert ((maps[..., 0] == 2) == (mask[2] & ~mask[0])).all()


def test_more_instances_than_a_uint16_map_holds_stop_with_an_error(monkeypatch):
    monkeypatch.setattr(labelmaps, "MAX_INSTANCES", 2)
    out = detections([[0, 0, 5, 5], [10, 10, 15, 15], [20, 20, 25, 25]], [0.9, 0.8, 0.7], [1, 1, 1])
    with pytest.raises(labelmaps.LabelMapError, match="more than 2 instances of class 1"):
        labelmaps.label_maps(out, (30, 30), 0.5)


@pytest.fixture
def checkpoint(demo_dir, tmp_path):
    """A checkpoint of the untrained tiny model, as train.py writes one."""
    torch.manual_seed(0)
    tiny = set_thresholds(build_model(TINY), SETTINGS)
    ids = list_train_ids(demo_dir)
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "model": tiny.state_dict(), "config": {**TINY, "DATA_DIR": str(demo_dir)},
                "epoch": 1, "train_ids": ids[2:], "val_ids": ids[:2]}, path)
    return ["--checkpoint", str(path), "--num-workers", "0", "--score-threshold", "0", "--label-map-score", "0",
            "--detections-per-image", "20", "--mask-threshold", "0.3", "--rpn-proposals", "200"]


def image_folder(folder):
    """An RGB PNG, a 12-bit grey image in a 16-bit TIFF, and a 300 x 2500 RGB TIFF strip: {name: (H, W)}."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    rgb = synth_image(rng, 80, 100)[0]
    cv2.imwrite(str(folder / "cells.png"), rgb[..., ::-1])
    tifffile.imwrite(folder / "grey16.tif", (synth_image(rng, 90, 70)[0][..., 0].astype(np.uint16) * 16))
    tifffile.imwrite(folder / "strip.tif", np.tile(synth_image(rng, 100, 100)[0], (3, 25, 1)))
    return {"cells.png": (80, 100), "grey16.tif": (90, 70), "strip.tif": (300, 2500)}


def check_label_maps(out, sizes):
    """Every image's four class files (uint16, its shape), and cells.csv's rows are exactly the maps' ids."""
    rows = read_rows(out / "cells.csv")
    assert list(rows[0]) == labelmaps.CSV_FIELDS and {r["image"] for r in rows} <= set(sizes)
    for name, size in sizes.items():
        for k in range(1, NUM_CLASSES + 1):
            lab = tifffile.imread(out / name.rsplit(".", 1)[0] / f"class{k}.tif")
            assert lab.dtype == np.uint16 and lab.shape == size
            ids = [int(r["instance"]) for r in rows if r["image"] == name and int(r["class"]) == k]
            assert ids == list(range(1, lab.max() + 1)) and set(np.unique(lab)) <= {0, *ids}
            assert [int(r["area"]) for r in rows if r["image"] == name and int(r["class"]) == k] \
                == np.bincount(lab.ravel())[1:].tolist()
    return rows


def test_infer_writes_label_maps_of_a_folder_of_any_images(checkpoint, tmp_path, capsys):
    sizes = image_folder(tmp_path / "images")
    out = tmp_path / "maps"
    args = checkpoint + ["--images", str(tmp_path / "images"), "--label-maps", str(out), "--input-scale", "0.25"]
    strip = torch.zeros(3, *sizes["strip.tif"])
    assert predict.tiling(strip, predict.predict_options(TINY, infer.prediction_settings(INPUT_SCALE=0.25)))[1]
    assert infer.main(args) == out
    rows = check_label_maps(out, sizes)
    assert {r["image"] for r in rows} == set(sizes)  # the untrained model finds cells in each
    printed = capsys.readouterr().out
    assert "wrote label maps of 3 image(s)" in printed and "s per megapixel" in printed
    assert "wrote label maps of 3 image(s)" in (out / "infer.log").read_text()


def test_label_maps_of_the_test_set(checkpoint, demo_dir, tmp_path):
    out = tmp_path / "maps"
    infer.main(checkpoint + ["--label-maps", str(out)])
    table = TestDataset(demo_dir).table
    check_label_maps(out, {r["file_name"]: (r["height"], r["width"]) for r in table})
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(r["file_name"][:-4] for r in table)


def test_folder_images_are_read_as_rgb_and_wide_integers_by_their_own_range(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "b.png"), np.full((8, 10), 1000, np.uint16))  # 16-bit PNG
    tifffile.imwrite(tmp_path / "c.tif", np.linspace(0, 4095, 80).astype(np.uint16).reshape(8, 10))  # 12-bit data
    (tmp_path / "notes.txt").write_text("not an image")
    data = ImageFolder(tmp_path)
    assert [r["file_name"] for r in data.table] == ["a.png", "b.png", "c.tif"]
    assert data[2][1] == {"id": 2, "file_name": "c.tif"}
    a, b, c = (data[i][0] for i in range(3))
    assert a.shape == (3, 8, 10) and torch.allclose(a[:, 0, 0], torch.tensor([200 / 255, 0, 0]))
    assert b.min() == 1.0 and c.max() > 0.99 and c.min() == 0  # not 1000/257 and 4095/257 grey levels


def test_bad_folders_and_files_stop_with_a_clear_error(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"holds no image to predict \(read: .tif, .tiff, .png, .jpg, .jpeg\)"):
        ImageFolder(empty)
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("a.png", "a.tif"):
        (twins / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"a\.png and .*a\.tif share a name"):
        ImageFolder(twins)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    (bad / "broken2.tif").write_bytes(b"not a tiff")
    out = tmp_path / "maps"
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        infer.main(checkpoint + ["--images", str(bad), "--label-maps", str(out)])
    assert not (out / "cells.csv").exists()
    with pytest.raises(DataError, match="broken2.tif: unreadable TIFF"):
        ImageFolder(bad)[1]
    log = ["--output-json", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit, match="add --label-maps OUT"):
        infer.main(checkpoint + log + ["--images", str(bad)])
    with pytest.raises(SystemExit, match="drop --eval, --sweep and --overlay"):
        infer.main(checkpoint + ["--label-maps", str(out), "--eval"])
