"""bench/realistic_data.py: the HW3 layout with the real validation geometry, and a COCO truth of its test part."""
import json

import pytest
from pycocotools.coco import COCO

from bench import hw3real
from dataset import CellDataset, TestDataset, check_train_data, list_train_ids
from bench.realistic_data import make_realistic_data


def test_realistic_data_keeps_the_real_geometry_in_the_hw3_layout(tmp_path):
    out = tmp_path / "rd"
    n_test = make_realistic_data(out, seed=3, test_fraction=0.4, images=5)
    ids = list_train_ids(out)
    assert n_test == 2 and len(ids) == 3
    summary = check_train_data(out, ids)
    # the 5 smallest real images: every training instance is a real annotation, pixel for pixel
    coco = hw3real.load_geometry()
    smallest = sorted(coco["images"], key=lambda im: (im["height"] * im["width"], im["id"]))[:5]
    real = {}
    for im in smallest:
        masks = [hw3real.decode(a) for a in coco["annotations"] if a["image_id"] == im["id"]]
        real[(im["height"], im["width"])] = masks
    ds = CellDataset(out, ids, train=False)
    total = 0
    for i in range(len(ds)):
        image, target = ds[i]
        masks = real[tuple(image.shape[-2:])]
        visible = target["masks"].numpy().astype(bool)
        total += len(visible)
        # each written instance equals a real mask (overlaps: a later cell hides part of an earlier one)
        assert all(any((m == r).all() or (m & ~r).sum() == 0 and m.sum() > 0 for r in masks) for m in visible)
    assert total == sum(summary["instances"]) > 0
    # the test part: images in test_release named by the id table, and their COCO ground truth
    table = json.loads((out / "test_image_name_to_ids.json").read_text())
    gt = COCO(str(out / "test_gt_coco.json"))
    assert sorted(gt.getImgIds()) == [r["id"] for r in table] == [1, 2]
    test = TestDataset(out)
    for k in range(len(test)):
        image, rec = test[k]
        assert list(image.shape[-2:]) == [rec["height"], rec["width"]]
        assert gt.getAnnIds(imgIds=[rec["id"]])
    with pytest.raises(SystemExit, match="already holds a dataset"):
        make_realistic_data(out, seed=3, images=5)


def test_realistic_data_is_seeded_and_painted(tmp_path):
    a = make_realistic_data(tmp_path / "a", seed=1, images=4, max_side=64)
    make_realistic_data(tmp_path / "b", seed=1, images=4, max_side=64)
    make_realistic_data(tmp_path / "c", seed=2, images=4, max_side=64)
    read = lambda d: sorted((p.relative_to(d).as_posix(), p.read_bytes()) for p in d.rglob("*.tif"))
    assert a == 1 and read(tmp_path / "a") == read(tmp_path / "b") and read(tmp_path / "a") != read(tmp_path / "c")
    ids = list_train_ids(tmp_path / "a")
    image, target = CellDataset(tmp_path / "a", ids, train=False)[0]
    rgb = image.numpy()
    inside = target["masks"].numpy().any(0)
    if inside.any():  # nuclei are darker than the stroma around them
        assert rgb[:, inside].mean() < rgb[:, ~inside].mean() - 0.1
    assert rgb.std() > 0.02  # texture, not a flat fill
