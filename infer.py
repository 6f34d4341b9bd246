"""Inference: a trained checkpoint -> test-results.json (COCO RLE), --eval / --sweep on the run's val
split, or label maps of the test set or of any folder of images (--label-maps, --images).

    python infer.py                                  # newest runs/*/best.pt -> test-results.json
    python infer.py --checkpoint runs/x/best.pt --mask-threshold 0.45
    python infer.py --checkpoint runs/x/best.pt --eval true --overlay 8   # AP50, costliest drawn
    python infer.py --checkpoint runs/x/best.pt --sweep true     # AP50 over mask x score thresholds
    python infer.py --overlay 8                      # submission + PNGs of its first 8 test images
    python infer.py --tta flips+scales --input-scale 2           # test-time augmentation, 2x input
    python infer.py --images my_images --label-maps maps         # any TIFF/PNG/JPEG -> label maps

The checkpoint alone rebuilds the model: its saved configuration names the backbone and sizes.
Predicting is predict.py's; scoring is evaluate.py's. What it prints is also appended to infer.log
where it writes: beside OUTPUT_JSON, in LABEL_MAPS, or (--eval, --sweep) in the checkpoint's folder.
"""
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

import evaluate
import labelmaps
import overlay
import utils
from dataset import CellDataset, DataError, ImageFolder, TestDataset
from predict import PredictionMemoryError, load_ensemble, predict_dataset, predict_each, to_records
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
IMAGES = ""                   # a folder of images to predict (TIFF/PNG/JPEG, any size) instead of the test set
LABEL_MAPS = ""               # a folder: per-class instance label maps per image and cells.csv instead of the JSON
LABEL_MAP_SCORE = 0.5         # label maps and cells.csv keep the detections scoring at least this
EVAL = False                  # true: score the checkpoint's val split instead of writing a submission
SWEEP = False                 # true: AP50 on the val split over mask and score thresholds (one model pass)
OVERLAY = 0                   # N > 0: PNGs of N images (val beside ground truth, costliest first; else test)
OVERLAY_SCORE = 0.0           # overlays and --eval's missed/false counts: scores from this; 0 = SCORE_THRESHOLD
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


FAILURES = (DataError, SubmissionError, CheckpointError, OSError, PredictionMemoryError,
            labelmaps.LabelMapError)  # 'error: ...', no traceback


def newest_checkpoint(pattern="runs/*/best.pt"):
    found = sorted(Path(".").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint given and none found as {pattern}; "
                                "pass --checkpoint path/to/best.pt")
    return found[-1]


def overlay_dir(output_json):
    """Where --overlay puts a submission's test-image PNGs: <output stem>-overlays/ beside it."""
    output_json = Path(output_json)
    return output_json.with_name(output_json.stem + "-overlays")


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
    costs = evaluate.image_costs(coco_gt, results, min_score=overlay_score(cfg))
    print_costs(costs, dataset, out_dir / "image_costs.csv", overlay_score(cfg))
    metrics["image_costs"] = costs
    if cfg["OVERLAY"] > 0:
        notes = {c["image_id"]: f"missed {sum(c['missed'].values())}, false {sum(c['false'].values())} at IoU 0.5"
                 for c in costs}
        shown = [c["image_id"] for c in costs][:cfg["OVERLAY"]] or list(range(min(cfg["OVERLAY"], len(dataset))))
        paths = overlay.write_overlays(dataset, results, out_dir / "overlays", shown, overlay_score(cfg), notes)
        print(f"wrote {len(paths)} overlay(s) to {out_dir / 'overlays'}, costliest first (left: ground truth, right: "
              f"predictions scoring >= {overlay_score(cfg):g}; {overlay.COLOUR_NAMES})")
        metrics["overlays"] = paths
    return metrics


def overlay_score(cfg):
    """The score from which overlays draw detections: OVERLAY_SCORE, or 0 for the predictions' SCORE_THRESHOLD."""
    return cfg["OVERLAY_SCORE"] or cfg["SCORE_THRESHOLD"]


def print_costs(costs, dataset, path, min_score, shown=10):
    """The val images that cost the most AP50, with their missed and false cells by class; all of them to a CSV."""
    def by_class(counts):
        return " ".join(f"{k}:{counts.get(k, 0)}" for k in range(1, utils.NUM_CLASSES + 1))
    rows = [{"image": dataset.ids[c["image_id"]], "ap50_cost": f"{c['cost']:.4f}",
             **{f"missed_class{k}": c["missed"].get(k, 0) for k in range(1, utils.NUM_CLASSES + 1)},
             **{f"false_class{k}": c["false"].get(k, 0) for k in range(1, utils.NUM_CLASSES + 1)}} for c in costs]
    utils.write_csv(path, rows, list(rows[0]) if rows else ["image", "ap50_cost"])
    print("  val images costing the most AP50 (AP50 without the image minus with it; cells missed and detections "
          f"false at IoU 0.5, score >= {min_score:g}, by class 1..4):")
    for c in costs[:shown]:
        print(f"    {dataset.ids[c['image_id']]:<40} {c['cost']:+.4f}  missed {by_class(c['missed'])}  "
              f"false {by_class(c['false'])}")
    print(f"  all {len(costs)} in {path}")


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
        paths = overlay.write_overlays(dataset, results, overlay_dir(cfg["OUTPUT_JSON"]),
                                       range(min(cfg["OVERLAY"], len(dataset))), overlay_score(cfg))
        print(f"wrote {len(paths)} overlay(s) of test images to {overlay_dir(cfg['OUTPUT_JSON'])} (predictions "
              f"scoring >= {overlay_score(cfg):g}; {overlay.COLOUR_NAMES})")
    if dataset.unlisted:
        print(f"warning: skipped {len(dataset.unlisted)} unlisted file(s) in {dataset.dir}: "
              + ", ".join(dataset.unlisted[:5]) + (" ..." if len(dataset.unlisted) > 5 else ""), file=sys.stderr)
    return cfg["OUTPUT_JSON"]


def predict_label_maps(cfg, model, data_dir, device, opts):
    """--label-maps: the images of --images (else of the test-id table) -> LABEL_MAPS/<image stem>/class1..4.tif
    (uint16 instance ids) and LABEL_MAPS/cells.csv (labelmaps.py)."""
    t0 = time.time()
    dataset = ImageFolder(cfg["IMAGES"]) if cfg["IMAGES"] else TestDataset(data_dir)
    predictions = predict_each(model, dataset, device, opts, cfg["NUM_WORKERS"], desc="label maps")
    counts, images, pixels = labelmaps.write_label_maps(dataset, predictions, cfg["LABEL_MAPS"], cfg["MASK_THRESHOLD"],
                                                         cfg["LABEL_MAP_SCORE"])
    seconds, megapixels = time.time() - t0, pixels / 1e6
    print(f"wrote label maps of {images} image(s) of {dataset.dir} to {cfg['LABEL_MAPS']} (<image>/class1..4.tif, "
          "cells.csv); instances " + ", ".join(f"class {k}: {n}" for k, n in enumerate(counts, 1))
          + f"; {seconds:.1f}s, {seconds / megapixels:.2f} s per megapixel")
    return Path(cfg["LABEL_MAPS"])


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
    """Where this run writes, infer.log included: LABEL_MAPS with --label-maps, OUTPUT_JSON's folder, or for --eval /
    --sweep the checkpoint's (an ensemble's: <first run>/ensemble/, not over that run's own sweep.csv and overlays)."""
    if cfg["LABEL_MAPS"]:
        return Path(cfg["LABEL_MAPS"])
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
    if cfg["IMAGES"] and not cfg["LABEL_MAPS"]:
        raise SystemExit(f"error: --images {cfg['IMAGES']} is predicted into label maps: add --label-maps OUT "
                         "(a folder for OUT/<image>/class1..4.tif and OUT/cells.csv)")
    if cfg["LABEL_MAPS"] and (cfg["EVAL"] or cfg["SWEEP"] or cfg["OVERLAY"]):
        raise SystemExit("error: --label-maps writes label maps only: drop --eval, --sweep and --overlay "
                         "(run them on their own)")
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
    if cfg["LABEL_MAPS"]:
        return predict_label_maps(cfg, models, data_dir, device, opts)
    return predict_test_set(cfg, models, data_dir, device, opts)


if __name__ == "__main__":
    try:
        main()
    except FAILURES as e:
        raise SystemExit(f"error: {e}") from None
