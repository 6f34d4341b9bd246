"""Instance label maps of predicted detections, as Cellpose/StarDist users read them: per image one uint16 TIFF
per class in the training layout (OUT/<image stem>/class1.tif .. class4.tif: 0 = background, ids 1..n) and one
OUT/cells.csv with a row per instance of every image.

    label_maps(detections, (H, W), mask_threshold)  -> HxWx4 uint16 maps and each instance's score
    instance_rows(image, maps, scores)               -> cells.csv rows, measured on the maps
    write_label_maps(dataset, predictions, out, threshold) every image's detections (predict_each) -> OUT
"""
import io
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage

from predict import pasted_masks, subset_detections
from utils import NUM_CLASSES, atomic_write, write_csv

MAX_INSTANCES = np.iinfo(np.uint16).max  # ids a uint16 map holds per class
MIN_FREE = 0.5                # a detection gets an id only if this share of its mask is unclaimed (detectron2's
                              # panoptic rule): no slivers of cells a better one covers
CSV_FIELDS = ["image", "class", "instance", "score", "area", "centroid_y", "centroid_x", "x0", "y0", "x1", "y1"]


class LabelMapError(ValueError):
    """More instances of a class in one image than a uint16 label map holds."""


def label_maps(output, image_size, mask_threshold, min_score=0.0):
    """One image's detections scoring at least min_score -> (HxWx4 uint16 maps, [per class: score of each id, id 1
    first]).

    Each class's detections claim their thresholded masks' free pixels in descending score order, so the
    higher score wins an overlap and ids 1..n follow the scores; one with less than MIN_FREE of its mask free
    gets no id."""
    height, width = (int(v) for v in image_size)
    maps = np.zeros((height, width, NUM_CLASSES), np.uint16)
    scores = [[] for _ in range(NUM_CLASSES)]
    scores_cpu = output["scores"].detach().cpu()
    order = torch.argsort(scores_cpu, descending=True, stable=True)
    order = order[scores_cpu[order] >= min_score]
    ranked = subset_detections(output, order)
    labels, ranked_scores = ranked["labels"].tolist(), ranked["scores"].tolist()
    for i, region, y0, x0 in pasted_masks(ranked, (height, width), mask_threshold):
        k = labels[i] - 1
        window = maps[y0:y0 + region.shape[0], x0:x0 + region.shape[1], k]
        free = region & (window == 0)
        if free.sum() < MIN_FREE * region.sum():
            continue
        if len(scores[k]) == MAX_INSTANCES:
            raise LabelMapError(f"more than {MAX_INSTANCES} instances of class {k + 1} in one image: a uint16 label "
                                "map cannot number them; lower --detections-per-image or raise --score-threshold")
        scores[k].append(ranked_scores[i])
        window[free] = len(scores[k])
    return maps, scores


def instance_rows(image, maps, scores):
    """cells.csv rows of one image's label maps: area (pixels), centroid (row, column) and box [x0, x1) x [y0, y1)
    of each instance id, measured on the map; score from label_maps."""
    rows = []
    for k in range(maps.shape[-1]):
        lab = maps[..., k]
        for n, sl in enumerate(ndimage.find_objects(lab), start=1):  # label_maps leaves no id without a pixel
            ys, xs = np.nonzero(lab[sl] == n)
            rows.append({"image": image, "class": k + 1, "instance": n, "score": f"{scores[k][n - 1]:.4f}",
                         "area": len(ys), "centroid_y": f"{ys.mean() + sl[0].start:.2f}",
                         "centroid_x": f"{xs.mean() + sl[1].start:.2f}", "x0": sl[1].start, "y0": sl[0].start,
                         "x1": sl[1].stop, "y1": sl[0].stop})
    return rows


def write_maps(folder, maps):
    """class1.tif .. class4.tif of one image's maps in `folder` (uint16, zlib), each written atomically."""
    for k in range(maps.shape[-1]):
        buf = io.BytesIO()  # tifffile names the file it writes: atomic_write's handle has no name
        tifffile.imwrite(buf, maps[..., k], compression="zlib")
        with atomic_write(Path(folder) / f"class{k + 1}.tif", "wb") as f:
            f.write(buf.getvalue())


def write_label_maps(dataset, predictions, out_dir, mask_threshold, min_score=0.0):
    """(image id, (H, W), detections) of a dataset with a `table` of {"id", "file_name"} (ImageFolder, TestDataset),
    e.g. predict.predict_each's, -> OUT/<file stem>/class<k>.tif and OUT/cells.csv, one image's detections and maps
    in memory at a time. Returns (instances per class, images, pixels)."""
    out_dir = Path(out_dir)
    names = {rec["id"]: rec["file_name"] for rec in dataset.table}
    rows, counts, images, pixels = [], [0] * NUM_CLASSES, 0, 0
    for image_id, size, output in predictions:
        maps, scores = label_maps(output, size, mask_threshold, min_score)
        write_maps(out_dir / Path(names[image_id]).stem, maps)
        rows += instance_rows(names[image_id], maps, scores)
        counts = [c + len(s) for c, s in zip(counts, scores)]
        images, pixels = images + 1, pixels + size[0] * size[1]
    write_csv(out_dir / "cells.csv", rows, CSV_FIELDS)
    return counts, images, pixels
