"""Inference: a trained checkpoint -> test-results.json (COCO RLE), or --eval on the run's val split
(scored by evaluate.py).

    python infer.py                                  # newest runs/*/best.pt -> test-results.json
    python infer.py --checkpoint runs/x/best.pt --mask-threshold 0.45
    python infer.py --checkpoint runs/x/best.pt --eval true
    python infer.py --checkpoint runs/x/best.pt --sweep --overlay 8   # threshold table + PNGs of the val split
    python infer.py --overlay 8                      # submission + PNGs of its first 8 test images
    python infer.py --tta flips+scales --scale 2                       # test-time augmentation, 2x input

The checkpoint alone rebuilds the model: its saved configuration names the backbone and sizes.
"""
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms, box_iou
from tqdm import tqdm

from dataset import DataError, TestDataset, collate, resize_factor, resize_image
from model import build_model, load_weights, set_inference_params
import utils
from utils import CheckpointError, apply_overrides, load_checkpoint, save_json

# ---- constants (each one can be overridden: --score-threshold 0.1, --eval true, ...) ----------
CHECKPOINT = ""               # '' = the newest runs/*/best.pt
DATA_DIR = ""                 # '' = the DATA_DIR the checkpoint was trained with
OUTPUT_JSON = "test-results.json"
SCORE_THRESHOLD = 0.05        # keep detections scoring at least this
NMS_THRESHOLD = 0.5           # per-class box NMS IoU
DETECTIONS_PER_IMAGE = 1000   # at most this many detections per image
MASK_THRESHOLD = 0.5          # mask probability above which a pixel is foreground
SCALE = 0.0                   # input upscaling factor; 0 = as trained (the checkpoint's SCALE / MIN_SIZE rule)
TTA = "none"                  # test-time augmentation: none | flips | flips+scales (fused, see fuse_detections)
TTA_SCALES = [0.8, 1.25]      # extra input scales of flips+scales, relative to SCALE
TILE = True                   # split an image whose input would pass MAX_SIZE into overlapping tiles
TILE_OVERLAP = 128            # tile overlap in image pixels: cells up to this size are whole in some tile
EVAL = False                  # true: score the checkpoint's val split instead of writing a submission
SWEEP = False                 # true: AP50 on the val split over mask and score thresholds (one model pass)
OVERLAY = 0                   # N > 0: PNGs of N images' predictions: val images beside their ground truth
                              # (with EVAL/SWEEP), else test images, in <OUTPUT_JSON stem>-overlays/
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
    load_weights(model, ckpt, checkpoint, averaged=True)  # a run with EMA: its averaged weights
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
    the image, not with detections x image. A detection whose mask is empty after thresholding is
    dropped: it could only be a false positive, and it would take one of the 100 detections per
    image and class that the leaderboard counts."""
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
        if not region.any():
            continue
        x_min, y_min, x_max, y_max = box
        results.append({"image_id": int(image_id), "bbox": [x_min, y_min, x_max - x_min, y_max - y_min],
                        "score": float(score), "category_id": int(label),
                        "segmentation": region_rle(region, y0, x0, height, width)})
    return results


# ---- one image: the training's sizing rule, tiles, test-time augmentation ------------------------
FIELDS = ("boxes", "scores", "labels", "mask_probs")


def _cat(outputs):
    return {k: torch.cat([o[k] for o in outputs]) for k in FIELDS}


def _select(out, index):
    return {k: out[k][index] for k in FIELDS}


def forward_resized(model, image, factor):
    """The model on one CxHxW image resized by `factor`; detections on the CPU, boxes in the image's pixels."""
    x = resize_image(image, factor)
    out = model([x])[0]
    out = {k: out[k].detach().cpu() if k == "labels" else out[k].detach().float().cpu() for k in FIELDS}
    out["boxes"] = resize_boxes(out["boxes"], x.shape[-2:], image.shape[-2:])
    return out


def tile_starts(length, tile, overlap):
    """Offsets of evenly spread tiles of `tile` px that cover `length` px, neighbours sharing >= overlap px."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_cores(starts, tile):
    """The stretch [lo, hi) each tile owns: overlaps split at their middle, the outer tiles own to infinity."""
    cuts = [(starts[i + 1] + starts[i] + tile) / 2 for i in range(len(starts) - 1)]
    return list(zip([-math.inf] + cuts, cuts + [math.inf]))


def predict_tiled(model, image, factor, tile, overlap, nms_threshold, limit):
    """Overlapping tiles of tile x tile image pixels, each resized by `factor`. A detection is kept by
    the tile that owns its box centre, so a cell up to `overlap` px wide comes from a tile that holds it
    whole and from no other; a class-wise NMS over the stitched set catches larger cells seen twice."""
    overlap = min(overlap, tile // 2)
    ys, xs = tile_starts(image.shape[-2], tile, overlap), tile_starts(image.shape[-1], tile, overlap)
    parts = []
    for y0, (ylo, yhi) in zip(ys, tile_cores(ys, tile)):
        for x0, (xlo, xhi) in zip(xs, tile_cores(xs, tile)):
            out = forward_resized(model, image[:, y0:y0 + tile, x0:x0 + tile], factor)
            out["boxes"] += torch.tensor([x0, y0, x0, y0], dtype=out["boxes"].dtype)
            cx = (out["boxes"][:, 0] + out["boxes"][:, 2]) / 2
            cy = (out["boxes"][:, 1] + out["boxes"][:, 3]) / 2
            parts.append(_select(out, (cx >= xlo) & (cx < xhi) & (cy >= ylo) & (cy < yhi)))
    out = _cat(parts)
    keep = batched_nms(out["boxes"], out["scores"], out["labels"], nms_threshold)[:limit]
    return _select(out, keep)


def predict_image(model, image, opts, scale_mult=1.0):
    """One CxHxW image of any size -> detections in its own pixels. The image is resized by the
    training's rule (dataset.resize_factor with the run's MIN_SIZE/MAX_SIZE/SCALE) times scale_mult;
    where that input would pass MAX_SIZE it is cut into overlapping tiles (opts['tile']), else shrunk to fit."""
    min_size, max_size, scale = opts["sizing"]
    h, w = image.shape[-2:]
    factor = resize_factor(h, w, min_size, max_size, scale, cap=False) * scale_mult
    if opts["tile"] and max(h, w) * factor > max_size * (1 + 1e-6):
        return predict_tiled(model, image, factor, int(max_size / factor), opts["overlap"], opts["nms"], opts["limit"])
    return forward_resized(model, image, min(factor, max_size / max(h, w)))


def tta_passes(mode, scales):
    """(flipped dims, scale multiplier) of each test-time pass."""
    flips = [((), 1.0), ((-1,), 1.0), ((-2,), 1.0)]
    passes = {"none": flips[:1], "flips": flips,
              "flips+scales": flips + [((), float(s)) for s in scales if float(s) != 1.0]}
    if mode not in passes:
        raise ValueError(f"TTA {mode!r}: choose none, flips or flips+scales")
    return passes[mode]


def unflip(out, dims, height, width):
    """Detections of a flipped image back in the image's frame (boxes mirrored, 28x28 masks flipped)."""
    boxes, probs = out["boxes"].clone(), out["mask_probs"]
    if -1 in dims:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        probs = probs.flip(-1)
    if -2 in dims:
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
        probs = probs.flip(-2)
    return {**out, "boxes": boxes, "mask_probs": probs}


def resample_masks(probs, src_boxes, dst_boxes):
    """(N,M,M) box-relative mask probabilities over src_boxes, sampled on the MxM grid of dst_boxes."""
    m = probs.shape[-1]
    t = (torch.arange(m, dtype=probs.dtype) + 0.5) / m

    def axis(lo, hi):  # destination cell centres in the source box's [-1, 1] (grid_sample, align_corners=False)
        coords = dst_boxes[:, lo, None] + t * (dst_boxes[:, hi] - dst_boxes[:, lo])[:, None]
        return 2 * (coords - src_boxes[:, lo, None]) / (src_boxes[:, hi] - src_boxes[:, lo]).clamp(min=1e-6)[:, None] - 1
    gx, gy = axis(0, 2), axis(1, 3)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
    return F.grid_sample(probs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def fuse_detections(outputs, iou_threshold, limit):
    """Merge the detections of several passes (weighted box and mask fusion; torchvision has only NMS).

    A class-wise box NMS over all passes picks one representative per cell; every detection joins the
    same-class representative it overlaps most (IoU > iou_threshold). A cell's box and 28x28 mask
    probabilities are the score-weighted means of its members' (masks resampled into the fused box);
    its score is the members' score sum over the number of passes, never above its best member's, so
    a cell that one pass of three found scores a third."""
    out = _cat(outputs)
    if len(out["boxes"]) == 0:
        return out
    keep = batched_nms(out["boxes"], out["scores"], out["labels"], iou_threshold)[:limit]
    iou = torch.nan_to_num(box_iou(out["boxes"][keep], out["boxes"]), nan=0.0)
    iou[out["labels"][keep][:, None] != out["labels"][None]] = -1.0
    iou[torch.arange(len(keep)), keep] = 2.0  # a representative is its own member, also a zero-area one
    best, owner = iou.max(0)
    member = best > iou_threshold
    idx, w = owner[member], out["scores"][member]
    k = len(keep)
    wsum = torch.zeros(k).index_add_(0, idx, w)
    boxes = torch.zeros(k, 4).index_add_(0, idx, w[:, None] * out["boxes"][member]) / wsum[:, None]
    top = torch.zeros(k).scatter_reduce_(0, idx, w, "amax", include_self=False)
    scores = torch.minimum(wsum / len(outputs), top)
    probs = resample_masks(out["mask_probs"][member, 0], out["boxes"][member], boxes[idx])
    masks = torch.zeros(k, *probs.shape[1:]).index_add_(0, idx, w[:, None, None] * probs) / wsum[:, None, None]
    order = scores.argsort(descending=True)
    return {"boxes": boxes[order], "scores": scores[order], "labels": out["labels"][keep][order],
            "mask_probs": masks[order, None]}


def predict_tta(model, image, opts):
    """Detections of one image with the test-time augmentation of opts['tta'] (passes fused)."""
    h, w = image.shape[-2:]
    outs = [unflip(predict_image(model, image.flip(dims) if dims else image, opts, mult), dims, h, w)
            for dims, mult in tta_passes(opts["tta"], opts["tta_scales"])]
    return outs[0] if len(outs) == 1 else fuse_detections(outs, opts["nms"], opts["limit"])


def predict_options(trained, scale=0.0, tta="none", tta_scales=TTA_SCALES, tile=TILE, overlap=TILE_OVERLAP,
                    nms_threshold=NMS_THRESHOLD, detections_per_image=DETECTIONS_PER_IMAGE):
    """How to predict, from a run's configuration (its sizing rule) and the inference constants."""
    tta_passes(tta, tta_scales)  # refuse an unknown mode now, not after the first image
    return {"sizing": (trained["MIN_SIZE"], trained["MAX_SIZE"], scale or trained.get("SCALE", 0.0)),
            "tta": tta, "tta_scales": tta_scales, "tile": tile, "overlap": overlap, "nms": nms_threshold,
            "limit": detections_per_image}


@torch.no_grad()
def raw_predictions(model, loader, device, opts, image_id_of, desc="predict"):
    """Run the model over a loader of (images, targets-or-records): [(image id, (H, W), detections)]."""
    model.eval()
    raw = []
    for images, metas in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        for image, meta in zip(images, metas):
            raw.append((image_id_of(meta), tuple(image.shape[-2:]), predict_tta(model, image.to(device), opts)))
    return raw


def to_records(raw, mask_threshold):
    return [r for image_id, size, out in raw for r in to_results(out, image_id, mask_threshold, size)]


def in_order_loader(dataset, num_workers=0):
    """One image at a time, in the dataset's order (validation and test)."""
    return torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate,
                                       num_workers=num_workers)


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


def main(argv=None):
    ns = {k: v for k, v in globals().items() if k.isupper() and not k.startswith("CLASS_")}
    cfg, _ = apply_overrides(ns, argv, description=__doc__)
    device = pick_device(cfg["DEVICE"])
    checkpoint = cfg["CHECKPOINT"] or newest_checkpoint()
    model, ckpt = load_model(checkpoint, device, cfg["SCORE_THRESHOLD"], cfg["NMS_THRESHOLD"],
                             cfg["DETECTIONS_PER_IMAGE"])
    try:
        opts = predict_options(ckpt["config"], cfg["SCALE"], cfg["TTA"], cfg["TTA_SCALES"], cfg["TILE"],
                               cfg["TILE_OVERLAP"], cfg["NMS_THRESHOLD"], cfg["DETECTIONS_PER_IMAGE"])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    data_dir = cfg["DATA_DIR"] or ckpt["config"]["DATA_DIR"]
    min_size, max_size, scale = opts["sizing"]
    print(f"checkpoint {checkpoint} (epoch {ckpt.get('epoch')}, backbone {ckpt['config']['BACKBONE']})"
          + (f", heads {ckpt['config']['HEADS']}" if ckpt["config"].get("HEADS", "standard") != "standard" else "")
          + (f", EMA weights (decay {ckpt['config']['EMA']:g})" if ckpt.get("ema") is not None else "")
          + f", data {data_dir}, device {device}; input " + (f"x{scale:g}" if scale else f"MIN_SIZE {min_size}")
          + f", at most {max_size} px a side" + (" (larger: tiles)" if opts["tile"] else "") + f", TTA {opts['tta']}")
    t0 = time.time()
    if cfg["EVAL"] or cfg["SWEEP"]:
        import evaluate  # scoring lives in evaluate.py, which imports this module
        return evaluate.run_on_val(cfg, model, ckpt, checkpoint, data_dir, device, opts)
    dataset = TestDataset(data_dir)
    if dataset.unlisted:
        print(f"warning: {len(dataset.unlisted)} file(s) in {dataset.dir} are not in the id table and are "
              f"skipped, e.g. {dataset.unlisted[0]}", file=sys.stderr)
    raw = raw_predictions(model, in_order_loader(dataset, cfg["NUM_WORKERS"]), device, opts, lambda rec: rec["id"],
                          desc="test")
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


if __name__ == "__main__":
    try:
        main()
    except (DataError, SubmissionError, CheckpointError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
