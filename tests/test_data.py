import json

import numpy as np
import pytest
import tifffile
import torch

from dataset import (CellDataset, DataError, TestDataset, instances_from_labels, list_train_ids, read_image,
                     read_label_maps, split_ids)


def test_real_course_sample_instances_and_boxes(sample_dir):
    ds = CellDataset(sample_dir, ["course-sample"], train=False)
    image, target = ds[0]
    assert image.shape == (3, 397, 482) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    labels = target["labels"].tolist()
    assert labels.count(1) == 2 and labels.count(2) == 159 and len(labels) == 161
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (161, 397, 482)
    for mask, box in zip(masks.numpy(), target["boxes"].numpy()):
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # the instances are exactly the label map's regions
    lab = tifffile.imread(sample_dir / "train" / "course-sample" / "class2.tif")
    assert (masks[labels.index(2):].sum(0).numpy() == (lab > 0)).all()


def test_one_pixel_instance_gets_positive_box_and_ids_may_repeat_across_classes():
    labels = np.zeros((8, 9, 4), np.float32)
    labels[3, 4, 0] = 7          # a 1-pixel class-1 instance
    labels[0:2, 0:3, 2] = 7      # the same id in class 3 is another instance
    masks, classes, boxes = instances_from_labels(labels)
    assert classes.tolist() == [1, 3]
    assert boxes.tolist() == [[4, 3, 5, 4], [0, 0, 3, 2]]
    assert masks.sum(axis=(1, 2)).tolist() == [1, 6]


def test_augmentation_only_on_training_split(demo_dir):
    ids = list_train_ids(demo_dir)[:1]
    val = CellDataset(demo_dir, ids, train=False)
    assert all(torch.equal(val[0][0], val[0][0]) for _ in range(3))  # deterministic
    train = CellDataset(demo_dir, ids, train=True)
    torch.manual_seed(0)
    np.random.seed(0)
    seen = {tuple(train[0][0].flatten()[:50].tolist()) for _ in range(8)}
    assert len(seen) > 1
    torch.manual_seed(5)
    first = train[0][0]
    torch.manual_seed(5)
    assert torch.equal(first, CellDataset(demo_dir, ids, train=True)[0][0])  # seeded by torch's RNG
    # boxes follow the augmented masks
    _, t = train[0]
    for mask, box in zip(t["masks"].numpy(), t["boxes"].numpy()):
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_split_is_seeded_and_disjoint():
    ids = [f"id{i}" for i in range(20)]
    a = split_ids(ids, 0.2, seed=3)
    assert a == split_ids(list(reversed(ids)), 0.2, seed=3)
    assert a != split_ids(ids, 0.2, seed=4)
    train, val = a
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == sorted(ids)
    assert split_ids(ids, 0.0, seed=3) == (sorted(ids), [])


def test_demo_data_has_the_hw3_layout(demo_dir):
    ids = list_train_ids(demo_dir)
    assert len(ids) == 6
    with tifffile.TiffFile(demo_dir / "train" / ids[0] / "image.tif") as tif:
        page = tif.pages[0]
        assert page.compression == tifffile.COMPRESSION.LZW
        assert page.shape[-1] == 4 and page.dtype == np.uint8
    classes_seen = set()
    for i in ids:
        for k in range(1, 5):
            p = demo_dir / "train" / i / f"class{k}.tif"
            if p.exists():
                lab = tifffile.imread(p)
                assert lab.dtype == np.float64 and (lab > 0).any()
                classes_seen.add(k)
    assert {1, 2} <= classes_seen
    table = json.loads((demo_dir / "test_image_name_to_ids.json").read_text())
    ds = TestDataset(demo_dir)
    image, rec = ds[0]
    assert rec == table[0] and image.shape[1:] == (rec["height"], rec["width"])


@pytest.mark.parametrize("kind", ["gray", "rgb", "uint16", "planar"])
def test_image_variants_read_as_rgb_uint8(tmp_path, kind):
    rng = np.random.default_rng(0)
    arr = {"gray": rng.integers(0, 255, (20, 30), dtype=np.uint8),
           "rgb": rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
           "uint16": rng.integers(0, 65535, (20, 30, 3), dtype=np.uint16),
           "planar": rng.integers(0, 255, (3, 20, 30), dtype=np.uint8)}[kind]
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, arr, photometric="minisblack" if kind != "rgb" else "rgb")
    image = read_image(path)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    if kind == "uint16":
        assert abs(int(image.max()) - int(arr.max()) // 257) <= 1


def test_label_map_problems_name_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "class1.tif", np.full((5, 5), 1.5))
    with pytest.raises(DataError, match=r"class1.tif.*non-integer"):
        read_label_maps(tmp_path, (5, 5))
    tifffile.imwrite(tmp_path / "class1.tif", np.zeros((4, 5)))
    with pytest.raises(DataError, match=r"class1.tif.*shape"):
        read_label_maps(tmp_path, (5, 5))


def test_missing_data_folder_says_what_layout_was_expected(tmp_path):
    with pytest.raises(DataError, match="does not exist.*train/<id>/image.tif"):
        list_train_ids(tmp_path / "nope")


def test_course_material_is_in_the_repo_and_geometry_reads_both_segmentation_forms(tmp_path):
    import gzip
    import json
    from bench import hw3real
    from conftest import ASSETS
    assert ASSETS.is_dir() and hw3real.SAMPLE.is_dir() and hw3real.TABLE.is_file()
    coco = hw3real.load_geometry()
    assert len(coco["images"]) == 50 and len(coco["annotations"]) == 6860
    ann = dict(coco["annotations"][0])
    truth = hw3real.decode(ann)
    # the course's own form: the RLE dict as a Python-repr string (single quotes)
    as_string = {**coco, "images": coco["images"][:1], "annotations": [{**ann, "segmentation": repr(ann["segmentation"])}]}
    path = tmp_path / "g.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(as_string, f)
    parsed = hw3real.load_geometry(path)["annotations"][0]
    assert isinstance(parsed["segmentation"], dict) and (hw3real.decode(parsed) == truth).all()
    assert truth.sum() == ann["area"]


def test_demo_data_carries_the_ground_truth_of_its_test_images(demo_dir):
    """bench/ablate.py scores the demo's test images: make_demo_data writes their COCO ground truth."""
    import evaluate
    from dataset import read_test_table
    gt = evaluate.test_ground_truth(demo_dir)
    table = read_test_table(demo_dir)
    assert sorted(gt.getImgIds()) == [r["id"] for r in table]
    for r in table:
        im = gt.loadImgs(r["id"])[0]
        assert (im["height"], im["width"]) == (r["height"], r["width"])
    anns = gt.loadAnns(gt.getAnnIds())
    assert anns and {a["category_id"] for a in anns} <= {1, 2, 3, 4}
    assert all(a["area"] >= 12 for a in anns)  # whole cells (slivers under 12 px are dropped when drawn)
