"""Inference: a trained checkpoint -> test-results.json (COCO RLE), or --eval / --sweep on the run's val split.

    python infer.py                                  # newest runs/*/best.pt -> test-results.json
    python infer.py --checkpoint runs/x/best.pt --mask-threshold 0.45
    python infer.py --checkpoint runs/x/best.pt --eval true
    python infer.py --checkpoint runs/x/best.pt --sweep true --overlay 8   # threshold table + PNGs of the val split
    python infer.py --overlay 8                      # submission + PNGs of its first 8 test images
    python infer.py --tta flips+scales --input-scale 2                     # test-time augmentation, 2x input

The checkpoint alone rebuilds the model: its saved configuration names the backbone and sizes. Predicting
is predict.py's; scoring is evaluate.py's. What it prints is also appended to infer.log where it writes:
beside OUTPUT_JSON, or in the checkpoint's folder for --eval / --sweep (output_dir).
"""
import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np

import evaluate
import utils
from dataset import CellDataset, DataError, TestDataset
from predict import PredictionMemoryError, load_ensemble, predict_dataset, to_records
from utils import CheckpointError, apply_overrides, config_block, pick_device, save_json

# ---- config: prediction (train.py's validation uses these too, but VAL_DETECTIONS_PER_IMAGE)
SCORE_THRESHOLD = 0.05        # keep detections scoring at least this
NMS_THRESHOLD = 0.5           # per-class box NMS IoU
DETECTIONS_PER_IMAGE = 1000   # at most this many detections an image, shared out by class (CLASS_RESERVE)
CLASS_RESERVE = 100           # each class keeps its best min(this, DETECTIONS_PER_IMAGE / classes); 0 = global top-k
MASK_THRESHOLD = 0.5          # mask probability above which a pixel is foreground
INPUT_SCALE = 0.0             # > 0: resize the input by this factor instead of the run's sizing; 0 = as trained
TTA = "none"                  # test-time augmentation: none | flips | flips+scales (passes fused)
TTA_SCALES = [0.8, 1.25]      # the extra input scales of flips+scales, relative to the input scale
TILE = True                   # true: an image larger than MAX_SIZE is cut into overlapping tiles; false: shrunk
TILE_OVERLAP = 128            # tile overlap in image pixels: cells up to this size lie whole in some tile
RPN_PROPOSALS = 2000          # RPN proposals an image (or tile) at test time, per level and after NMS
CASCADE_SCORE_STAGES = 3      # HEADS cascade: score = mean class probability of stages 1..N (1, 2 or 3)
# ---- config: what to run (docs/levers.md says why each prediction default is what it is)
CHECKPOINT = ""               # '' = the newest runs/*/best.pt; a.pt,b.pt,...: an ensemble (detections fused)
DATA_DIR = ""                 # '' = the DATA_DIR the checkpoint was trained with
OUTPUT_JSON = "test-results.json"  # the submission file (COCO RLE records)
EVAL = False                  # true: score the checkpoint's val split instead of writing a submission
SWEEP = False                 # true: AP50 on the val split over mask and score thresholds (one model pass)
OVERLAY = 0                   # N > 0: PNGs of N images (val beside ground truth with EVAL/SWEEP, else test)
DEVICE = "auto"               # auto | cpu | cuda | cuda:1 ...
NUM_WORKERS = 2               # data-loading processes
# ---- end of config

CONFIG = config_block(__file__)  # [(NAME, section, help)]
PREDICTION = [name for name, section, _ in CONFIG if section.startswith("prediction")]
SWEEP_MASK_THRESHOLDS = [round(0.3 + 0.05 * i, 2) for i in range(11)]  # 0.3 .. 0.8
SWEEP_SCORE_THRESHOLDS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]


def prediction_settings(**overrides):
    """The prediction constants above as a dict (what predict.py takes), with some replaced."""
    unknown = set(overrides) - set(PREDICTION)
    if unknown:
        raise ValueError(f"not prediction settings: {sorted(unknown)}")
    return {**{name: globals()[name] for name in PREDICTION}, **overrides}


class SubmissionError(ValueError):
    pass


FAILURES = (DataError, SubmissionError, CheckpointError, OSError, PredictionMemoryError)  # 'error: ...', no traceback


def newest_checkpoint(pattern="runs/*/best.pt"):
    found = sorted(Path(".").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint given and none found as {pattern}; "
                                "pass --checkpoint path/to/best.pt")
    return found[-1]


CLASS_COLOURS = {1: (230, 25, 75), 2: (60, 180, 75), 3: (0, 130, 200), 4: (255, 225, 25)}  # RGB


def draw_outlines(rgb, masks_and_labels):
    """Class-coloured 1-px outlines of each (HxW mask, label) over a copy of an RGB uint8 image."""
    canvas = rgb.copy()
    for mask, label in masks_and_labels:
        contours, _ = cv2.findContours(np.ascontiguousarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, CLASS_COLOURS.get(int(label), (255, 255, 255)), 1)
    return canvas


def to_rgb(image):
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def draw_records(rgb, results, image_id, min_score):
    shown = [r for r in results if r["image_id"] == image_id and r["score"] >= min_score]
    return draw_outlines(rgb, ((utils.decode_mask(r["segmentation"]), r["category_id"]) for r in shown))


def write_png(panel, path):
    """An RGB panel as a PNG (atomic); small images enlarged (nearest) to at least 256 px to stay legible."""
    zoom = max(1, math.ceil(256 / max(panel.shape[:2])))
    panel = np.repeat(np.repeat(panel, zoom, 0), zoom, 1)
    _, png = cv2.imencode(".png", panel[..., ::-1])
    with utils.atomic_write(path, "wb") as f:
        f.write(png.tobytes())
    return path


def write_overlays(dataset, results, out_dir, n, min_score=0.5):
    """PNG for each of the first n images of a CellDataset: ground truth (left) beside its records
    (image_id = dataset index) scoring >= min_score (right)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id in range(min(n, len(dataset))):
        image, target = dataset[image_id]
        rgb = to_rgb(image)
        truth = draw_outlines(rgb, zip(target["masks"].numpy(), target["labels"].tolist()))
        pred = draw_records(rgb, results, image_id, min_score)
        panel = np.concatenate([truth, np.full((rgb.shape[0], 4, 3), 255, np.uint8), pred], 1)
        paths.append(write_png(panel, out_dir / f"{dataset.ids[image_id]}.png"))
    return paths


def overlay_dir(output_json):
    """Where --overlay puts a submission's test-image PNGs: <output stem>-overlays/ beside it."""
    output_json = Path(output_json)
    return output_json.with_name(output_json.stem + "-overlays")


def write_test_overlays(dataset, results, out_dir, n, min_score=0.5):
    """PNG for each of the first n images of a TestDataset: its submission records (image_id from the
    id table) scoring >= min_score, outlined; named after the test file (<name>.png)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(n, len(dataset))):
        image, rec = dataset[index]
        pred = draw_records(to_rgb(image), results, rec["id"], min_score)
        paths.append(write_png(pred, out_dir / f"{Path(rec['file_name']).stem}.png"))
    return paths


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


def sweep(raw, coco_gt, mask_thresholds=SWEEP_MASK_THRESHOLDS, score_thresholds=SWEEP_SCORE_THRESHOLDS):
    """AP50 (maxDets 100) for every mask threshold x score threshold from one set of raw predictions:
    {(mask_threshold, score_threshold): ap50}."""
    table = {}
    for mt in mask_thresholds:
        records = to_records(raw, mt)
        for st in score_thresholds:
            table[(mt, st)] = evaluate.coco_evaluate(coco_gt, [r for r in records if r["score"] >= st])["ap50"]
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


def run_on_val(cfg, model, ckpt, checkpoint, data_dir, device, opts, out_dir):
    """--eval / --sweep (and their --overlay): one pass of the model (or ensemble: lists of models and opts)
    over the (first) checkpoint's val split; sweep.csv and overlays/ in out_dir."""
    if not ckpt.get("val_ids"):
        raise SystemExit(f"{checkpoint} has no validation split to evaluate (trained with VAL_FRACTION 0)")
    dataset = CellDataset(data_dir, ckpt["val_ids"], train=False)
    coco_gt = evaluate.val_ground_truth(dataset)
    raw = predict_dataset(model, dataset, device, opts, cfg["NUM_WORKERS"], desc="validate")
    results = to_records(raw, cfg["MASK_THRESHOLD"])
    metrics = evaluate.coco_evaluate(coco_gt, results, max_dets=100)
    metrics["ap50_maxdets1000"] = evaluate.coco_evaluate(coco_gt, results, max_dets=1000)["ap50"]
    metrics.update(evaluate.matching_accuracy(coco_gt, results))
    print_metrics(metrics, len(dataset), len(results))
    limit = evaluate.ceiling(coco_gt)
    print("  " + evaluate.format_ceiling(limit, metrics["ap50"]))
    if limit["capped"]:
        print("  most capped: " + ", ".join(f"{dataset.ids[i]} class {k}: {n} cells" for i, k, n in limit["capped"][:5]))
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg["SWEEP"]:
        table = sweep(raw, coco_gt, sorted({*SWEEP_MASK_THRESHOLDS, cfg["MASK_THRESHOLD"]}),
                      sorted({*SWEEP_SCORE_THRESHOLDS, cfg["SCORE_THRESHOLD"]}))
        print(format_sweep(table))
        utils.write_csv(out_dir / "sweep.csv", [{"mask_threshold": m, "score_threshold": s, "ap50": f"{v:.6f}"}
                                                for (m, s), v in sorted(table.items())],
                        ["mask_threshold", "score_threshold", "ap50"])
        print(f"wrote {out_dir / 'sweep.csv'}")
        metrics["sweep"] = table
    if cfg["OVERLAY"] > 0:
        paths = write_overlays(dataset, results, out_dir / "overlays", cfg["OVERLAY"])
        print(f"wrote {len(paths)} overlay(s) to {out_dir / 'overlays'} (left: ground truth, right: predictions "
              "scoring >= 0.5; class 1 red, 2 green, 3 blue, 4 yellow)")
        metrics["overlays"] = paths
    return metrics


def predict_test_set(cfg, model, data_dir, device, opts):
    """The submission: every image of the test-id table -> cfg OUTPUT_JSON (checked before and after writing)."""
    t0 = time.time()
    dataset = TestDataset(data_dir)
    if dataset.unlisted:
        print(f"warning: {len(dataset.unlisted)} file(s) in {dataset.dir} are not in the id table and are "
              f"skipped, e.g. {dataset.unlisted[0]}", file=sys.stderr)
    raw = predict_dataset(model, dataset, device, opts, cfg["NUM_WORKERS"], desc="test")
    results = to_records(raw, cfg["MASK_THRESHOLD"])
    write_submission(results, dataset.table, cfg["OUTPUT_JSON"])
    dropped = sum(len(out["boxes"]) for _, _, out in raw) - len(results)
    print(f"wrote {cfg['OUTPUT_JSON']}: {len(results)} detections on {len(dataset)} images "
          f"in {time.time() - t0:.1f}s ({dropped} detection(s) dropped: mask empty at MASK_THRESHOLD "
          f"{cfg['MASK_THRESHOLD']})")
    empty = len(dataset) - len({r["image_id"] for r in results})
    if empty:
        print(f"note: {empty} image(s) have no detection above SCORE_THRESHOLD (valid: they simply score 0)")
    if cfg["OVERLAY"] > 0:
        paths = write_test_overlays(dataset, results, overlay_dir(cfg["OUTPUT_JSON"]), cfg["OVERLAY"])
        print(f"wrote {len(paths)} overlay(s) of test images to {overlay_dir(cfg['OUTPUT_JSON'])} (predictions "
              "scoring >= 0.5; class 1 red, 2 green, 3 blue, 4 yellow)")
    if dataset.unlisted:
        print(f"warning: skipped {len(dataset.unlisted)} unlisted file(s) in {dataset.dir}: "
              + ", ".join(dataset.unlisted[:5]) + (" ..." if len(dataset.unlisted) > 5 else ""), file=sys.stderr)
    return cfg["OUTPUT_JSON"]


def describe(checkpoint, ckpt, opts):
    trained, (min_size, max_size, scale) = ckpt["config"], opts["sizing"]
    return (f"checkpoint {checkpoint} (epoch {ckpt.get('epoch')}, backbone {trained['BACKBONE']})"
            + (f", heads {trained['HEADS']}" if trained["HEADS"] != "standard" else "")
            + (f", EMA weights (decay {trained['EMA']:g})" if ckpt.get("ema") is not None else "")
            + "; input " + (f"x{scale:g}" if scale else f"MIN_SIZE {min_size}")
            + f", at most {max_size} px a side" + (" (larger: tiles)" if opts["tile"] else "") + f", TTA {opts['tta']}")


def check_ensemble_split(checkpoints, ckpts):
    """--eval/--sweep of an ensemble score the first checkpoint's val split: no member may have trained on it."""
    val = set(ckpts[0].get("val_ids") or [])
    for checkpoint, ckpt in zip(checkpoints[1:], ckpts[1:]):
        seen = val & set(ckpt.get("train_ids") or [])
        if seen:
            raise SystemExit(f"{checkpoint} trained on {len(seen)} image(s) of {checkpoints[0]}'s val split "
                             f"(e.g. {sorted(seen)[0]}): the ensemble's val score would be inflated. Ensemble "
                             "checkpoints of one split (train.py SPLIT_SEED) to evaluate, or write the submission")


def checkpoint_list(text):
    """CHECKPOINT -> [path]: 'a.pt,b.pt' is two, split after '.pt' / '.pth' only, so a comma inside a path stays
    (bench/ablate.py's run folders: 'runs/abl/heads=cascade,seed=42/best.pt'); an existing file is one checkpoint."""
    text = str(text).strip()
    if not text or Path(text).is_file():
        return [text] if text else []
    return [c.strip() for c in re.split(r"(?<=\.pt),|(?<=\.pth),", text) if c.strip()]


def output_dir(cfg, checkpoints):
    """Where this run writes, infer.log included: OUTPUT_JSON's folder, or for --eval / --sweep the checkpoint's
    (an ensemble's: <first run>/ensemble/, not over that run's own sweep.csv and overlays)."""
    if cfg["EVAL"] or cfg["SWEEP"]:
        return Path(checkpoints[0]).parent / ("ensemble" if len(checkpoints) > 1 else "")
    return Path(cfg["OUTPUT_JSON"]).parent


def failure_line(error):
    """The last line a failure shows on the console, printed after the log closed (None: an exit without one)."""
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, str) else None
    return f"error: {error}" if isinstance(error, FAILURES) else f"{type(error).__name__}: {error}"


def main(argv=None):
    cfg, _ = apply_overrides(globals(), CONFIG, argv, description=__doc__)
    checkpoints = checkpoint_list(cfg["CHECKPOINT"]) or [newest_checkpoint()]
    log = output_dir(cfg, checkpoints) / "infer.log"
    try:
        with utils.tee_output(log):
            print(f"infer.py {' '.join(sys.argv[1:] if argv is None else argv)} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
            return predict_or_score(cfg, checkpoints)
    except BaseException as e:
        line = failure_line(e)
        if line:
            with contextlib.suppress(OSError), open(log, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        raise


def predict_or_score(cfg, checkpoints):
    """The submission, or --eval / --sweep of the val split, with the checkpoints' models."""
    device = pick_device(cfg["DEVICE"])
    settings = {name: cfg[name] for name in PREDICTION}
    try:
        models, opts, ckpts = load_ensemble(checkpoints, device, settings)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    data_dir = cfg["DATA_DIR"] or ckpts[0]["config"]["DATA_DIR"]
    for checkpoint, ckpt, o in zip(checkpoints, ckpts, opts):
        print(describe(checkpoint, ckpt, o))
    print(f"data {data_dir}, device {device}" + (f"; an ensemble of {len(models)} checkpoints, detections fused"
                                                  if len(models) > 1 else ""))
    if cfg["EVAL"] or cfg["SWEEP"]:
        check_ensemble_split(checkpoints, ckpts)
        return run_on_val(cfg, models, ckpts[0], checkpoints[0], data_dir, device, opts,
                          output_dir(cfg, checkpoints))
    return predict_test_set(cfg, models, data_dir, device, opts)


if __name__ == "__main__":
    try:
        main()
    except FAILURES as e:
        raise SystemExit(f"error: {e}") from None
