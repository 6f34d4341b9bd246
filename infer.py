"""Inference: a trained checkpoint -> test-results.json (COCO RLE), or --eval on the run's val split.

    python infer.py                                  # newest runs/*/best.pt -> test-results.json
    python infer.py --checkpoint runs/x/best.pt --mask-threshold 0.45
    python infer.py --checkpoint runs/x/best.pt --eval true

The checkpoint alone rebuilds the model: its saved configuration names the backbone and sizes.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from tqdm import tqdm

from dataset import CellDataset, DataError, TestDataset, collate
from model import build_model, load_weights, set_inference_params
import utils
from utils import (CheckpointError, apply_overrides, coco_evaluate, coco_ground_truth, load_checkpoint,
                   matching_accuracy, save_json)

# ---- constants (each one can be overridden: --score-threshold 0.1, --eval true, ...) ----------
CHECKPOINT = ""               # '' = the newest runs/*/best.pt
DATA_DIR = ""                 # '' = the DATA_DIR the checkpoint was trained with
OUTPUT_JSON = "test-results.json"
SCORE_THRESHOLD = 0.05        # keep detections scoring at least this
NMS_THRESHOLD = 0.5           # per-class box NMS IoU
DETECTIONS_PER_IMAGE = 1000   # at most this many detections per image
MASK_THRESHOLD = 0.5          # mask probability above which a pixel is foreground
EVAL = False                  # true: score the checkpoint's val split instead of writing a submission
DEVICE = "auto"               # auto | cpu | cuda | cuda:1 ...
NUM_WORKERS = 2
# ------------------------------------------------------------------------------------------------


class SubmissionError(ValueError):
    pass


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def newest_checkpoint(pattern="runs/*/best.pt"):
    found = sorted(Path(".").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint given and none found as {pattern}; "
                                "pass --checkpoint path/to/best.pt")
    return found[-1]


def load_model(checkpoint, device, score_threshold=SCORE_THRESHOLD, nms_threshold=NMS_THRESHOLD,
               detections_per_image=DETECTIONS_PER_IMAGE):
    """Rebuild the trained model from a checkpoint alone. Returns (model in eval mode, checkpoint)."""
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt["config"], load_pretrained=False)
    load_weights(model, ckpt, checkpoint)
    set_inference_params(model, score_threshold, nms_threshold, detections_per_image)
    return model.to(device).eval(), ckpt


def paste_in_box(mask, box, im_h, im_w, threshold):
    """One MxM mask probability map pasted into its box only, thresholded: (region bool, y0, x0).

    The same arithmetic as torchvision's paste_mask_in_image (integer box after the 1-pixel
    padding of expand_masks/expand_boxes, bilinear resize, clip to the image), so the pixels
    equal the stock path's, without the full-size canvas."""
    w = max(int(box[2] - box[0] + 1), 1)
    h = max(int(box[3] - box[1] + 1), 1)
    resized = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    x0, x1 = max(int(box[0]), 0), min(int(box[2]) + 1, im_w)
    y0, y1 = max(int(box[1]), 0), min(int(box[3]) + 1, im_h)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), bool), 0, 0
    region = resized[y0 - int(box[1]):y1 - int(box[1]), x0 - int(box[0]):x1 - int(box[0])] > threshold
    return region.cpu().numpy(), y0, x0


def region_rle(region, y0, x0, height, width):
    """COCO compressed RLE of a full HxW mask that is `region` at (y0, x0) and 0 elsewhere, built from
    the region's runs alone (pycocotools encodes only full-size arrays)."""
    if region.size == 0 or not region.any():
        counts = [height * width]
    else:
        columns = np.pad(region.T, ((0, 0), (1, 1))).astype(np.int8)  # image columns (RLE is column-major)
        step = np.diff(columns, axis=1)
        cs, rs = np.nonzero(step == 1)
        ce, re = np.nonzero(step == -1)
        starts = (x0 + cs) * height + y0 + rs
        ends = (x0 + ce) * height + y0 + re
        joined = ends[:-1] == starts[1:]  # a run that ends a column and goes on at the next one's top
        starts, ends = starts[np.r_[True, ~joined]], ends[np.r_[~joined, True]]
        counts = np.empty(2 * len(starts) + 1, np.int64)
        counts[0] = starts[0]
        counts[2:-1:2] = starts[1:] - ends[:-1]
        counts[1::2] = ends - starts
        counts[-1] = height * width - ends[-1]
        counts = counts.tolist()
        if counts[-1] == 0:
            counts.pop()
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def to_results(output, image_id, mask_threshold, image_size):
    """One image's model output -> submission records (bbox xywh, RLE with str counts).

    Each box-relative mask is pasted into its box region and encoded from there: memory grows with
    the image, not with detections x image."""
    boxes = output["boxes"].detach().cpu()
    if len(boxes) == 0:
        return []
    height, width = (int(v) for v in image_size)
    probs = output["mask_probs"].detach().cpu().float()
    probs, scale = expand_masks(probs, padding=1)
    pasted_boxes = expand_boxes(boxes, scale).to(torch.int64).tolist()
    results = []
    for prob, pbox, box, score, label in zip(probs[:, 0], pasted_boxes, boxes.tolist(), output["scores"].tolist(),
                                             output["labels"].tolist()):
        region, y0, x0 = paste_in_box(prob, pbox, height, width, mask_threshold)
        x_min, y_min, x_max, y_max = box
        results.append({"image_id": int(image_id), "bbox": [x_min, y_min, x_max - x_min, y_max - y_min],
                        "score": float(score), "category_id": int(label),
                        "segmentation": region_rle(region, y0, x0, height, width)})
    return results


@torch.no_grad()
def predict(model, loader, device, mask_threshold, image_id_of, desc="predict"):
    """Run the model over a loader of (images, targets-or-records); returns submission records."""
    model.eval()
    results = []
    for images, metas in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        outputs = model([im.to(device, non_blocking=True) for im in images])
        for out, meta, image in zip(outputs, metas, images):
            results.extend(to_results(out, image_id_of(meta), mask_threshold, image.shape[-2:]))
    return results


def val_ground_truth(dataset):
    """COCO ground truth of an un-augmented CellDataset; image ids are dataset indices."""
    def images():
        for i in range(len(dataset)):
            image, target = dataset[i]
            yield {"id": i, "height": image.shape[1], "width": image.shape[2],
                   "masks": target["masks"].numpy(), "labels": target["labels"].numpy()}
    return coco_ground_truth(images())


def evaluate(model, dataset, device, mask_threshold=MASK_THRESHOLD, coco_gt=None, num_workers=0):
    """Leaderboard-style segm AP50 (maxDets 100) and AP@[.5:.95] on a CellDataset."""
    coco_gt = coco_gt if coco_gt is not None else val_ground_truth(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate,
                                         num_workers=num_workers)
    results = predict(model, loader, device, mask_threshold, lambda t: t["image_id"], desc="validate")
    return coco_evaluate(coco_gt, results, max_dets=100), results


def check_submission(results, table):
    """Refuse a submission the leaderboard would reject or mis-score."""
    sizes = {rec["id"]: [rec["height"], rec["width"]] for rec in table}
    for i, r in enumerate(results):
        where = f"submission record {i} (image_id {r.get('image_id')!r})"
        if set(r) != {"image_id", "bbox", "score", "category_id", "segmentation"}:
            raise SubmissionError(f"{where}: keys must be image_id, bbox, score, category_id, segmentation; got {sorted(r)}")
        if r["image_id"] not in sizes:
            raise SubmissionError(f"{where}: image id is not in the test-id table")
        if not (isinstance(r["category_id"], int) and 1 <= r["category_id"] <= utils.NUM_CLASSES):
            raise SubmissionError(f"{where}: category_id {r['category_id']!r} is outside 1..{utils.NUM_CLASSES}")
        seg = r["segmentation"]
        if not isinstance(seg, dict) or not isinstance(seg.get("counts"), str):
            raise SubmissionError(f"{where}: segmentation counts must be a str (compressed RLE), "
                                  f"got {type(seg.get('counts') if isinstance(seg, dict) else seg).__name__}")
        if list(seg.get("size", [])) != sizes[r["image_id"]]:
            raise SubmissionError(f"{where}: mask size {seg.get('size')} differs from the image's {sizes[r['image_id']]}")
        if not (len(r["bbox"]) == 4 and all(np.isfinite(r["bbox"])) and np.isfinite(r["score"])):
            raise SubmissionError(f"{where}: bbox and score must be finite numbers")
    return True


def write_submission(results, table, path):
    check_submission(results, table)
    save_json(results, path)
    check_submission(json.loads(Path(path).read_text()), table)  # what landed on disk is what we checked
    return path


def main(argv=None):
    ns = {k: v for k, v in globals().items() if k.isupper()}
    cfg, _ = apply_overrides(ns, argv, description=__doc__)
    device = pick_device(cfg["DEVICE"])
    checkpoint = cfg["CHECKPOINT"] or newest_checkpoint()
    model, ckpt = load_model(checkpoint, device, cfg["SCORE_THRESHOLD"], cfg["NMS_THRESHOLD"],
                             cfg["DETECTIONS_PER_IMAGE"])
    data_dir = cfg["DATA_DIR"] or ckpt["config"]["DATA_DIR"]
    print(f"checkpoint {checkpoint} (epoch {ckpt.get('epoch')}, backbone {ckpt['config']['BACKBONE']}), "
          f"data {data_dir}, device {device}")
    t0 = time.time()
    if cfg["EVAL"]:
        if not ckpt.get("val_ids"):
            raise SystemExit(f"{checkpoint} has no validation split to evaluate (trained with VAL_FRACTION 0)")
        dataset = CellDataset(data_dir, ckpt["val_ids"], train=False)
        coco_gt = val_ground_truth(dataset)
        metrics, results = evaluate(model, dataset, device, cfg["MASK_THRESHOLD"], coco_gt, cfg["NUM_WORKERS"])
        metrics["ap50_maxdets1000"] = coco_evaluate(coco_gt, results, max_dets=1000)["ap50"]
        metrics.update(matching_accuracy(coco_gt, results))
        print(f"val images {len(dataset)}, detections {len(results)}\n"
              f"  AP50 (leaderboard, maxDets 100) {metrics['ap50']:.4f}\n"
              f"  AP50 (maxDets 1000)             {metrics['ap50_maxdets1000']:.4f}\n"
              f"  AP@[.5:.95]                     {metrics['ap']:.4f}\n"
              f"  per-class AP50                  "
              + "  ".join(f"{k}: {v:.3f}" for k, v in metrics["per_class_ap50"].items()) + "\n"
              f"  accuracy@0.5 TP/(TP+FP+FN)      {metrics['accuracy']:.4f} (TP {metrics['tp']}, FP {metrics['fp']}, "
              f"FN {metrics['fn']}; score >= 0.5)")
        return metrics
    dataset = TestDataset(data_dir)
    if dataset.unlisted:
        print(f"warning: {len(dataset.unlisted)} file(s) in {dataset.dir} are not in the id table and are "
              f"skipped, e.g. {dataset.unlisted[0]}", file=sys.stderr)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate,
                                         num_workers=cfg["NUM_WORKERS"])
    results = predict(model, loader, device, cfg["MASK_THRESHOLD"], lambda rec: rec["id"], desc="test")
    write_submission(results, dataset.table, cfg["OUTPUT_JSON"])
    print(f"wrote {cfg['OUTPUT_JSON']}: {len(results)} detections on {len(dataset)} images "
          f"in {time.time() - t0:.1f}s")
    empty = len(dataset) - len({r["image_id"] for r in results})
    if empty:
        print(f"note: {empty} image(s) have no detection above SCORE_THRESHOLD (valid: they simply score 0)")
    if dataset.unlisted:
        print(f"warning: skipped {len(dataset.unlisted)} unlisted file(s) in {dataset.dir}: "
              + ", ".join(dataset.unlisted[:5]) + (" ..." if len(dataset.unlisted) > 5 else ""), file=sys.stderr)
    return cfg["OUTPUT_JSON"]


if __name__ == "__main__":
    try:
        main()
    except (DataError, SubmissionError, CheckpointError, OSError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
