"""Pictures of predictions: masks filled in their class colour with each detection's score, ground truth beside
them on val images, as PNGs (infer.py --overlay N).

torchvision.utils draws the fill (draw_segmentation_masks); OpenCV what it lacks: one outline an instance (so
touching cells of a class stay apart), the scores as text on the class colour (draw_bounding_boxes fills a
label's background only from torchvision 0.23/0.24, and requirements.txt allows 0.19) and the titles. Each
instance is drawn within its own extent, so a 2500-px image with 1000 detections takes seconds, not a minute.
"""
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.utils import draw_segmentation_masks

import utils
from predict import image_id, image_name

CLASS_COLOURS = {1: (230, 25, 75), 2: (60, 180, 75), 3: (0, 130, 200), 4: (255, 225, 25)}  # RGB of each class
COLOUR_NAMES = "class 1 red, 2 green, 3 blue, 4 yellow"  # CLASS_COLOURS in words
FILL_ALPHA = 0.4              # opacity of the class colour over a mask
TITLE_HEIGHT = 18             # px of the title strip above each panel
MIN_SIDE = 256                # a smaller panel is enlarged (nearest) to at least this many px a side
SCORE_FONT = 0.35             # OpenCV font scale of the scores (about 7 px tall)


def draw_instances(rgb, instances):
    """instances [(HxW bool mask, class, score, box xyxy)] over a copy of an RGB uint8 image: each class's masks
    filled in its colour, each instance outlined, and the score written at its box's corner (score None: not)."""
    h, w = rgb.shape[:2]
    union = np.zeros((len(CLASS_COLOURS), h, w), bool)
    outlines = np.zeros((h, w), np.uint8)  # class of the outline pixel (0: none)
    scores = []
    for mask, label, score, box in instances:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows) == 0:
            continue
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = mask[y0:y1, x0:x1]
        union[int(label) - 1, y0:y1, x0:x1] |= crop
        contours, _ = cv2.findContours(np.pad(crop, 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE,
                                       offset=(int(x0) - 1, int(y0) - 1))
        cv2.drawContours(outlines, contours, -1, int(label), 1)
        if score is not None:
            scores.append((f"{score:.2f}", box, CLASS_COLOURS[int(label)]))
    canvas = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    present = [k for k in range(len(CLASS_COLOURS)) if union[k].any()]
    if present:
        canvas = draw_segmentation_masks(canvas, torch.from_numpy(union[present]), alpha=FILL_ALPHA,
                                         colors=[CLASS_COLOURS[k + 1] for k in present])
    canvas = canvas.permute(1, 2, 0).numpy().copy()
    for k, colour in CLASS_COLOURS.items():
        canvas[outlines == k] = colour
    for text, box, colour in scores:  # on the class colour at the box's top-left: legible on any tissue
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, SCORE_FONT, 1)
        x, y = int(max(box[0], 0)), int(max(box[1], 0))
        cv2.rectangle(canvas, (x, y), (x + tw + 1, y + th + base), colour, cv2.FILLED)
        ink = (0, 0, 0) if sum(colour) > 400 else (255, 255, 255)  # black on yellow
        cv2.putText(canvas, text, (x + 1, y + th + 1), cv2.FONT_HERSHEY_SIMPLEX, SCORE_FONT, ink, 1, cv2.LINE_AA)
    return canvas


def titled(panel, title):
    """A panel with a title strip above it (white text on black)."""
    strip = np.zeros((TITLE_HEIGHT, panel.shape[1], 3), np.uint8)
    cv2.putText(strip, title, (3, TITLE_HEIGHT - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([strip, panel], 0)


def side_by_side(panels):
    """Panels of one height in a row, 4 white px apart."""
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([p for panel in panels for p in (gap, panel)][1:], 1)


def write_png(panel, path):
    """An RGB panel as a PNG (atomic), enlarged (nearest) to at least MIN_SIDE px a side to stay legible."""
    zoom = max(1, math.ceil(MIN_SIDE / max(panel.shape[:2])))
    panel = np.repeat(np.repeat(panel, zoom, 0), zoom, 1)
    _, png = cv2.imencode(".png", panel[..., ::-1])
    with utils.atomic_write(path, "wb") as f:
        f.write(png.tobytes())
    return Path(path)


def to_rgb(image):
    """A dataset's CxHxW float image in [0, 1] -> HxWx3 uint8."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def write_overlays(dataset, results, out_dir, indices, min_score, notes=None):
    """A PNG for each dataset index in `indices` (in that order), named after the image: its records scoring at
    least min_score, and, for a CellDataset, its ground truth on the left. notes: {index: text} added to the
    prediction's title (e.g. the image's missed and false cells). Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_image = {}
    for r in results:
        if r["score"] >= min_score:
            by_image.setdefault(r["image_id"], []).append(r)
    paths = []
    for index in indices:
        image, meta = dataset[index]
        rgb, shown = to_rgb(image), by_image.get(image_id(meta), [])
        pred = draw_instances(rgb, ((utils.decode_mask(r["segmentation"]).view(bool), r["category_id"], r["score"],
                                     [*r["bbox"][:2], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]])
                                    for r in shown))
        title = f"{len(shown)} predicted, score >= {min_score:g}"
        if notes and index in notes:
            title += f"; {notes[index]}"
        panels = [titled(pred, title)]
        if "masks" in meta:  # a val image: its ground truth first
            truth = draw_instances(rgb, ((m.astype(bool), k, None, None) for m, k in
                                         zip(meta["masks"].numpy(), meta["labels"].tolist())))
            panels.insert(0, titled(truth, f"ground truth: {len(meta['labels'])} cells"))
        name = Path(meta["file_name"]).stem if "file_name" in meta else image_name(dataset, meta)  # a sample's folder
        paths.append(write_png(side_by_side(panels), out_dir / f"{name}.png"))
    return paths
