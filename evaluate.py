"""Scoring, the leaderboard's way: pycocotools COCOeval, iouType segm, maxDets (1, 10, 100), of
submission-format records against COCO ground truth. Depends on nothing that predicts: train.py's
validation (through engine.py), infer.py (--eval, --sweep) and bench/ablate.py hand it records.

COCO ground truth from masks or from a file, COCOeval AP50/AP, what each image costs the AP50 (image_costs),
and the cell papers' matching accuracy (as torchvision's references keep coco_eval.py apart).
"""
import contextlib
import copy
import io
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils import NUM_CLASSES, bytes_rle, coco_dict


def coco_ground_truth(images):
    """A pycocotools COCO object from [{'id', 'height', 'width', 'masks' (N,H,W), 'labels' (N,)}]."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = coco_dict(images)
        coco.createIndex()
    return coco


def segm_eval(coco_gt, results, max_dets=100, img_ids=None):
    """pycocotools' COCOeval (segm, maxDets (1, 10, max_dets)) of the records, evaluated image by image."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r, segmentation=bytes_rle(r["segmentation"])) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.imgIds = sorted(coco_gt.getImgIds()) if img_ids is None else list(img_ids)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
    return ev


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
    ev = segm_eval(coco_gt, results, max_dets, img_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
        ev.summarize()
    stats = [float("nan") if s < 0 else float(s) for s in ev.stats]
    return {"ap50": stats[1], "ap": stats[0], "ap75": stats[2], "per_class_ap50": per_class_ap50(ev)}


def per_class_ap50(ev):
    """{class: AP50} of an accumulated COCOeval (area all, the last maxDets); NaN for a class without cells."""
    per_class = {}
    for k_index, cat in enumerate(ev.params.catIds):
        # precision: [T iou thresholds, R recall, K categories, A areas, M maxDets]
        p = ev.eval["precision"][0, :, k_index, 0, -1]
        p = p[p > -1]
        per_class[int(cat)] = float(p.mean()) if p.size else float("nan")
    return per_class


def ap50_of(ev, leave_out=None):
    """AP50 (area all, the last maxDets) of an evaluated COCOeval, over its images but the index leave_out:
    pycocotools' own accumulate over the kept per-image evaluations (its accumulate(p) mis-indexes a subset)."""
    pe = ev._paramsEval
    if leave_out is not None:
        n = len(pe.imgIds)
        ev = copy.copy(ev)
        ev._paramsEval = copy.deepcopy(pe)
        ev._paramsEval.imgIds = [i for j, i in enumerate(pe.imgIds) if j != leave_out]
        ev.params = ev._paramsEval
        ev.evalImgs = [e for j, e in enumerate(ev.evalImgs) if j % n != leave_out]  # [class][area][image]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
    per_class = [ap for ap in per_class_ap50(ev).values() if not np.isnan(ap)]
    return float(np.mean(per_class)) if per_class else float("nan")


def image_costs(coco_gt, results, min_score, max_dets=100):
    """What each image costs the AP50: AP50 over the other images minus AP50 over all (> 0: the image pulls it
    down), and per class its cells no detection of score >= min_score matches at mask IoU 0.5 (missed) and its
    detections of score >= min_score that match no cell (false), as COCOeval matches them (same class, by score,
    within the max_dets counted). Returns [{'image_id', 'cost', 'missed': {k: n}, 'false': {k: n}}], costliest first."""
    if not results:
        return []
    ev = segm_eval(coco_gt, results, max_dets)
    img_ids = ev._paramsEval.imgIds
    everything = ap50_of(ev)
    rows = {i: {"image_id": i, "missed": {}, "false": {}} for i in img_ids}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        scores = dict(zip(e["dtIds"], e["dtScores"]))
        gt_match = e["gtMatches"][0][~np.asarray(e["gtIgnore"], bool)]
        missed = sum(1 for d in gt_match if d == 0 or scores.get(int(d), 0.0) < min_score)
        false = sum(1 for d, m, ignore in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0])
                    if m == 0 and not ignore and scores[d] >= min_score)
        row = rows[e["image_id"]]
        if missed:
            row["missed"][e["category_id"]] = missed
        if false:
            row["false"][e["category_id"]] = false
    for j, i in enumerate(img_ids):
        rows[i]["cost"] = ap50_of(ev, leave_out=j) - everything
    return sorted(rows.values(), key=lambda r: -r["cost"])


def ceiling(coco_gt, max_dets=100, img_ids=None):
    """The highest AP50 any submission can reach on this ground truth, the metric keeping at most `max_dets`
    detections per image and class (pycocotools' maxDets). In an image with n cells of a class, at most
    min(max_dets, n) can be found, so a class's recall is capped at sum(min(max_dets, n)) / sum(n) over the
    images; a perfect submission has precision 1 up to that recall and none beyond, so its AP is the share
    of pycocotools' 101 recall thresholds at or below the cap. AP50 is the mean over classes with cells.
    Returns {'ap50', 'per_class': {k: {'cells', 'reachable', 'recall', 'ap50'}}, 'capped': [(image id, class,
    cells)] where the cap bites, most cells first}."""
    img_ids = sorted(coco_gt.getImgIds()) if img_ids is None else list(img_ids)
    thresholds = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs
    per_class, capped = {}, []
    for k in range(1, NUM_CLASSES + 1):
        counts = [(i, len(coco_gt.getAnnIds(imgIds=[i], catIds=[k], iscrowd=False))) for i in img_ids]
        cells = sum(n for _, n in counts)
        if cells == 0:
            continue
        reachable = sum(min(max_dets, n) for _, n in counts)
        recall = reachable / cells
        per_class[k] = {"cells": cells, "reachable": reachable, "recall": recall,
                        "ap50": float((thresholds <= recall).mean())}
        capped += [(i, k, n) for i, n in counts if n > max_dets]
    ap50 = float(np.mean([c["ap50"] for c in per_class.values()])) if per_class else float("nan")
    return {"ap50": ap50, "per_class": per_class, "capped": sorted(capped, key=lambda c: -c[2])}


def format_ceiling(limit, ap50=None, max_dets=100):
    """One line: the ceiling of AP50 (maxDets max_dets), per class where it caps recall, and AP50 as its share."""
    capped = [f"class {k} recall <= {c['recall']:.2f}" for k, c in limit["per_class"].items() if c["recall"] < 1]
    return (f"AP50 ceiling (maxDets {max_dets}) {limit['ap50']:.3f}"
            + (f" ({', '.join(capped)}; {len(limit['capped'])} image-class pair(s) over {max_dets} cells)"
               if capped else " (no image holds more cells of a class than the metric counts)")
            + (f"; AP50 {ap50:.4f} is {ap50 / limit['ap50']:.0%} of it" if ap50 is not None and limit["ap50"] > 0
               else ""))


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
        gts = [bytes_rle(a["segmentation"]) for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_id))]
        preds = sorted(by_image.get(img_id, []), key=lambda r: -r["score"])
        if not gts or not preds:
            fp += len(preds)
            fn += len(gts)
            continue
        ious = mask_utils.iou([bytes_rle(p["segmentation"]) for p in preds], gts, [0] * len(gts))
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
