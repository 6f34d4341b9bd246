"""Scoring, the leaderboard's way: pycocotools COCOeval, iouType segm, maxDets (1, 10, 100), for
train.py (val AP50 every epoch), infer.py (--eval, --sweep) and ablate.py (held-out test images).

COCO ground truth from masks, COCOeval of submission-format records, the cell papers' matching
accuracy, and the val split's predictions scored (as torchvision's references keep coco_eval.py apart).
"""
import contextlib
import io
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import infer
import utils
from dataset import CellDataset
from utils import NUM_CLASSES, _bytes_rle


def coco_ground_truth(images):
    """Build a pycocotools COCO object from [{'id', 'height', 'width', 'masks' (N,H,W), 'labels' (N,)}]."""
    dataset = {"images": [], "annotations": [],
               "categories": [{"id": k, "name": f"class{k}"} for k in range(1, NUM_CLASSES + 1)]}
    ann_id = 1
    for im in images:
        dataset["images"].append({"id": int(im["id"]), "height": int(im["height"]), "width": int(im["width"])})
        for mask, label in zip(im["masks"], im["labels"]):
            rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
            dataset["annotations"].append({
                "id": ann_id, "image_id": int(im["id"]), "category_id": int(label), "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
            ann_id += 1
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def coco_evaluate(coco_gt, results, max_dets=100, img_ids=None):
    """Segmentation COCOeval of `results` (submission-format dicts) against `coco_gt`.

    Returns {'ap50', 'ap', 'ap75', 'per_class_ap50': {k: ap}}; AP is NaN where the ground truth
    has no instance (pycocotools' -1), and 0 where there are instances but no predictions.
    """
    img_ids = sorted(coco_gt.getImgIds()) if img_ids is None else list(img_ids)
    has_gt = len(coco_gt.getAnnIds(imgIds=img_ids)) > 0
    if not results:
        zero = 0.0 if has_gt else float("nan")
        return {"ap50": zero, "ap": zero, "ap75": zero,
                "per_class_ap50": {k: (0.0 if coco_gt.getAnnIds(imgIds=img_ids, catIds=[k]) else float("nan"))
                                   for k in range(1, NUM_CLASSES + 1)}}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r, segmentation=_bytes_rle(r["segmentation"])) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.imgIds = img_ids
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float("nan") if s < 0 else float(s) for s in ev.stats]
    # precision: [T iou thresholds, R recall, K categories, A areas, M maxDets]; area 'all', last maxDets
    per_class = {}
    for k_index, cat in enumerate(ev.params.catIds):
        p = ev.eval["precision"][0, :, k_index, 0, -1]
        p = p[p > -1]
        per_class[int(cat)] = float(p.mean()) if p.size else float("nan")
    return {"ap50": stats[1], "ap": stats[0], "ap75": stats[2], "per_class_ap50": per_class}


def matching_accuracy(coco_gt, results, iou_threshold=0.5, min_score=0.5):
    """The cell papers' accuracy (Cellpose, StarDist): TP / (TP + FP + FN) over all images, where
    predictions scoring at least min_score are matched one-to-one to ground-truth instances of any
    class at mask IoU >= iou_threshold, greedily in score order."""
    by_image = {}
    for r in results:
        if r["score"] >= min_score:
            by_image.setdefault(r["image_id"], []).append(r)
    tp = fp = fn = 0
    for img_id in coco_gt.getImgIds():
        gts = [_bytes_rle(a["segmentation"]) for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_id))]
        preds = sorted(by_image.get(img_id, []), key=lambda r: -r["score"])
        if not gts or not preds:
            fp += len(preds)
            fn += len(gts)
            continue
        ious = mask_utils.iou([_bytes_rle(p["segmentation"]) for p in preds], gts, [0] * len(gts))
        matched = np.zeros(len(gts), bool)
        for row in np.asarray(ious).reshape(len(preds), len(gts)):
            row = np.where(matched, -1.0, row)
            j = int(row.argmax())
            if row[j] >= iou_threshold:
                matched[j] = True
                tp += 1
            else:
                fp += 1
        fn += int((~matched).sum())
    total = tp + fp + fn
    return {"accuracy": tp / total if total else float("nan"), "tp": tp, "fp": fp, "fn": fn}


def test_ground_truth(data_dir):
    """DATA_DIR/test_gt_coco.json (bench/realistic_data.py writes it; image ids from the test-id table) as COCO."""
    path = Path(data_dir) / "test_gt_coco.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ground truth of the test images (bench/realistic_data.py writes one)")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def val_ground_truth(dataset):
    """COCO ground truth of an un-augmented CellDataset; image ids are dataset indices."""
    def images():
        for i in range(len(dataset)):
            image, target = dataset[i]
            yield {"id": i, "height": image.shape[1], "width": image.shape[2],
                   "masks": target["masks"].numpy(), "labels": target["labels"].numpy()}
    return coco_ground_truth(images())


def val_predictions(model, dataset, device, opts, num_workers=0):
    """raw_predictions of a CellDataset at its own image size (sizing None); image ids = dataset indices."""
    return infer.raw_predictions(model, infer.in_order_loader(dataset, num_workers), device, opts,
                                 lambda t: t["image_id"], "validate")


def evaluate(model, dataset, device, opts, mask_threshold=infer.MASK_THRESHOLD, coco_gt=None, num_workers=0):
    """Leaderboard-style segm AP50 (maxDets 100) and AP@[.5:.95] on a CellDataset at its own image
    size (sizing None): the model input is sized, tiled and augmented as at test time."""
    coco_gt = coco_gt if coco_gt is not None else val_ground_truth(dataset)
    results = infer.to_records(val_predictions(model, dataset, device, opts, num_workers), mask_threshold)
    return coco_evaluate(coco_gt, results, max_dets=100), results


SWEEP_MASK_THRESHOLDS = [round(0.3 + 0.05 * i, 2) for i in range(11)]  # 0.3 .. 0.8
SWEEP_SCORE_THRESHOLDS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]


def sweep(raw, coco_gt, mask_thresholds=SWEEP_MASK_THRESHOLDS, score_thresholds=SWEEP_SCORE_THRESHOLDS):
    """AP50 (maxDets 100) for every mask threshold x score threshold from one set of raw predictions:
    {(mask_threshold, score_threshold): ap50}."""
    table = {}
    for mt in mask_thresholds:
        records = infer.to_records(raw, mt)
        for st in score_thresholds:
            table[(mt, st)] = coco_evaluate(coco_gt, [r for r in records if r["score"] >= st], max_dets=100)["ap50"]
    return table


def format_sweep(table):
    mts = sorted({k[0] for k in table})
    sts = sorted({k[1] for k in table})
    best = max(table, key=table.get)
    lines = ["AP50 (maxDets 100) by mask threshold (rows) and score threshold (columns)",
             "mask \\ score " + "".join(f"{st:>8.2f}" for st in sts)]
    for mt in mts:
        lines.append(f"{mt:>12.2f} " + "".join(f"{table[(mt, st)]:>8.4f}" for st in sts))
    lines.append(f"best: mask threshold {best[0]}, score threshold {best[1]} -> AP50 {table[best]:.4f}")
    return "\n".join(lines)


def print_metrics(metrics, n_images, n_detections):
    print(f"val images {n_images}, detections {n_detections}\n"
          f"  AP50 (leaderboard, maxDets 100) {metrics['ap50']:.4f}\n"
          f"  AP50 (maxDets 1000)             {metrics['ap50_maxdets1000']:.4f}\n"
          f"  AP@[.5:.95]                     {metrics['ap']:.4f}\n"
          f"  per-class AP50                  "
          + "  ".join(f"{k}: {v:.3f}" for k, v in metrics["per_class_ap50"].items()) + "\n"
          f"  accuracy@0.5 TP/(TP+FP+FN)      {metrics['accuracy']:.4f} (TP {metrics['tp']}, FP {metrics['fp']}, "
          f"FN {metrics['fn']}; score >= 0.5)")


def run_on_val(cfg, model, ckpt, checkpoint, data_dir, device, opts):
    """--eval / --sweep (and their --overlay): one pass of the model over the checkpoint's val split."""
    if not ckpt.get("val_ids"):
        raise SystemExit(f"{checkpoint} has no validation split to evaluate (trained with VAL_FRACTION 0)")
    dataset = CellDataset(data_dir, ckpt["val_ids"], train=False)
    coco_gt = val_ground_truth(dataset)
    raw = val_predictions(model, dataset, device, opts, cfg["NUM_WORKERS"])
    results = infer.to_records(raw, cfg["MASK_THRESHOLD"])
    metrics = coco_evaluate(coco_gt, results, max_dets=100)
    metrics["ap50_maxdets1000"] = coco_evaluate(coco_gt, results, max_dets=1000)["ap50"]
    metrics.update(matching_accuracy(coco_gt, results))
    print_metrics(metrics, len(dataset), len(results))
    out_dir = Path(checkpoint).parent
    if cfg["SWEEP"]:
        table = sweep(raw, coco_gt, sorted({*SWEEP_MASK_THRESHOLDS, cfg["MASK_THRESHOLD"]}),
                      sorted({*SWEEP_SCORE_THRESHOLDS, cfg["SCORE_THRESHOLD"]}))
        print(format_sweep(table))
        lines = ["mask_threshold,score_threshold,ap50"] + [f"{m},{s},{v:.6f}" for (m, s), v in sorted(table.items())]
        with utils.atomic_write(out_dir / "sweep.csv", "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out_dir / 'sweep.csv'}")
        metrics["sweep"] = table
    if cfg["OVERLAY"] > 0:
        paths = infer.write_overlays(dataset, results, out_dir / "overlays", cfg["OVERLAY"])
        print(f"wrote {len(paths)} overlay(s) to {out_dir / 'overlays'} (left: ground truth, right: predictions "
              "scoring >= 0.5; class 1 red, 2 green, 3 blue, 4 yellow)")
        metrics["overlays"] = paths
    return metrics


