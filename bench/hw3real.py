"""The public HW3 course material kept in the repo (assets/hw3-real, see its README.md): paths and readers.

    SAMPLE      the course's sample training folder (image.tif, class1.tif, class2.tif), byte for byte
    TABLE       the real test-id table (101 records: file_name, id, height, width)
    GEOMETRY    COCO ground truth (RLE masks, classes, sizes; no pixels) of 50 real validation images, gzipped
"""
import ast
import gzip
import json
from pathlib import Path

from pycocotools import mask as mask_utils

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "hw3-real"
SAMPLE = ASSETS / "sample_train" / "course-sample"
TABLE = ASSETS / "test_image_name_to_ids.json"
GEOMETRY = ASSETS / "val_geometry_coco.json.gz"


def load_geometry(path=GEOMETRY):
    """The validation geometry as a COCO dict; each annotation's segmentation a dict with str counts.
    The course stores segmentation as a Python-repr string of the RLE dict: parsed with ast.literal_eval."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        coco = json.load(f)
    for ann in coco["annotations"]:
        seg = ann["segmentation"]
        if isinstance(seg, str):
            seg = ast.literal_eval(seg)
        if isinstance(seg.get("counts"), bytes):
            seg = {**seg, "counts": seg["counts"].decode("ascii")}
        ann["segmentation"] = seg
    return coco


def decode(ann):
    """One annotation's full-image mask (H x W bool)."""
    seg = ann["segmentation"]
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")}).astype(bool)
