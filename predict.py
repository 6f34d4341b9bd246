"""Predicting: a model and one image -> detections; a dataset -> submission-format records.

Library code that infer.py's command line, train.py's validation and bench/ablate.py call:
    load_model(checkpoint, device, settings)    the trained model, rebuilt from its checkpoint alone
    load_ensemble(checkpoints, device, settings) several, each rebuilt from its own checkpoint, with its opts
    predict_options(trained_cfg, settings)      how to predict (the run's sizing rule and the settings)
    predict_dataset(model, dataset, ...)        [(image id, (H, W), detections)] of a CellDataset / TestDataset /
                                                ImageFolder
    predict_each(model, dataset, ...)           the same, yielded image by image (label maps of a large folder)
    to_records(raw, mask_threshold)             -> COCO records (bbox, score, category, compressed RLE)
    pasted_masks(detections, (H, W), threshold)  each detection's mask in its box region of the image

`settings` is a dict of infer.py's prediction constants (SCORE_THRESHOLD, NMS_THRESHOLD,
DETECTIONS_PER_IMAGE, CLASS_RESERVE, MASK_THRESHOLD, INPUT_SCALE, TTA, TTA_SCALES, TILE, TILE_OVERLAP).
Each image is resized by the run's own sizing rule (dataset.resize_factor), tiled where the input would
pass MAX_SIZE, optionally flipped/rescaled (TTA) and the passes fused; masks stay box-relative until
each is pasted into its box region and encoded from there. An image that runs out of GPU memory is
predicted again in smaller tiles (predict_or_retry) before an error names it.
"""
import gc
import math

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms, box_iou
from tqdm import tqdm

from dataset import collate, resize_factor, resize_image
from heads import class_budget
from model import build_model, load_weights, set_thresholds
from utils import load_checkpoint

OOM_TILE_DIVISORS = [2, 4]    # out of GPU memory: the image again in tiles 1/2, then 1/4 the input side that failed
OOM_MASK_CHUNK = 100          # ... with the mask head over at most this many detections at once
CORE_MARGIN = 1 / 8           # tiles keep detections centred up to this share of the overlap past a seam (core_margin)


class PredictionMemoryError(torch.cuda.OutOfMemoryError):
    """An image that ran out of GPU memory also in the smaller retries; the message names it and what to lower."""


def load_model(checkpoint, device, settings):
    """Rebuild the trained model from a checkpoint alone, with the settings' score threshold, NMS and
    detection limit. Returns (model in eval mode, checkpoint)."""
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt["config"], load_pretrained=False)
    load_weights(model, ckpt, checkpoint, averaged=True)  # a run with EMA: its averaged weights
    set_thresholds(model, settings)
    return model.to(device).eval(), ckpt


def load_ensemble(checkpoints, device, settings):
    """Models of one or more checkpoints (which may differ in backbone, heads and input size), each rebuilt
    from its own configuration and predicting with its own sizing rule: ([model], [opts], [checkpoint dict])."""
    models, opts, ckpts = [], [], []
    for checkpoint in checkpoints:
        model, ckpt = load_model(checkpoint, device, settings)
        models.append(model)
        opts.append(predict_options(ckpt["config"], settings))
        ckpts.append(ckpt)
    return models, opts, ckpts


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


def pasted_masks(output, image_size, mask_threshold):
    """Each detection's box-relative mask pasted into its box region of an image of image_size (H, W), thresholded:
    yields (detection index, region bool, y0, x0) of the detections whose mask is not empty.

    Memory grows with the image, not with detections x image. A detection whose mask is empty after
    thresholding is left out: it could only be a false positive, and it would take one of the 100
    detections per image and class that the leaderboard counts."""
    boxes = output["boxes"].detach().cpu()
    if len(boxes) == 0:
        return
    height, width = (int(v) for v in image_size)
    probs, scale = expand_masks(output["mask_probs"].detach().cpu().float(), padding=1)
    for i, pbox in enumerate(expand_boxes(boxes, scale).to(torch.int64).tolist()):
        region, y0, x0 = paste_in_box(probs[i, 0], pbox, height, width, mask_threshold)
        if region.any():
            yield i, region, y0, x0


def image_records(output, image_id, mask_threshold, image_size):
    """One image's detections -> submission records (bbox xywh, RLE with str counts; pasted_masks)."""
    height, width = (int(v) for v in image_size)
    boxes, scores, labels = output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist()
    records = []
    for i, region, y0, x0 in pasted_masks(output, image_size, mask_threshold):
        x_min, y_min, x_max, y_max = boxes[i]
        records.append({"image_id": int(image_id), "bbox": [x_min, y_min, x_max - x_min, y_max - y_min],
                        "score": float(scores[i]), "category_id": int(labels[i]),
                        "segmentation": region_rle(region, y0, x0, height, width)})
    return records


# ---- one image: the training's sizing rule, tiles, test-time augmentation ------------------------
FIELDS = ("boxes", "scores", "labels", "mask_probs")


def cat_detections(outputs):
    """Several detection dicts as one (FIELDS concatenated)."""
    return {k: torch.cat([o[k] for o in outputs]) for k in FIELDS}


def subset_detections(out, index):
    """The detections of `out` at index (a bool mask or indices)."""
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


def tile_grid(shape, tile, overlap):
    """(row starts, column starts) of the tiles that cover an image of `shape` (H, W); the overlap is capped at half
    a tile, so a tile's core (tile_cores) is never empty."""
    overlap = min(overlap, tile // 2)
    return tile_starts(shape[0], tile, overlap), tile_starts(shape[1], tile, overlap)


def tile_cores(starts, tile):
    """The stretch [lo, hi) each tile owns: overlaps split at their middle, the outer tiles own to infinity."""
    cuts = [(starts[i + 1] + starts[i] + tile) / 2 for i in range(len(starts) - 1)]
    return list(zip([-math.inf] + cuts, cuts + [math.inf]))


def core_margin(tile, overlap):
    """How far past each seam of its core (px) a tile keeps detections: CORE_MARGIN of the overlap, capped as in
    tile_grid. A seam lies >= overlap / 2 px from both tiles' edges, so a cell kept through the margin is whole
    in its tile up to overlap - 2 margins px wide (96 px at TILE_OVERLAP 128; the 99th-percentile cell: 63 px)."""
    return min(overlap, tile // 2) * CORE_MARGIN


def tile_owns(boxes, ycore, xcore, margin):
    """Bool mask of the boxes (image pixels) whose centre lies in a tile's core ([lo, hi) rows and columns of
    tile_cores) widened by `margin` px on each side (an outer side is infinite already)."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    (ylo, yhi), (xlo, xhi) = ycore, xcore
    return (cx >= xlo - margin) & (cx < xhi + margin) & (cy >= ylo - margin) & (cy < yhi + margin)


def predict_tiled(model, image, factor, tile, tile_overlap, nms_threshold, detections_per_image, class_reserve,
                  mask_chunk=0):
    """Overlapping tiles of tile x tile image pixels, each resized by `factor`. A detection is kept by
    every tile whose core, widened by core_margin past its seams, holds its box centre (tile_owns), so a cell
    on a seam is kept unless the tiles' estimates of its centre differ by two margins, and one up to
    tile_overlap - 2 margins px wide only from tiles that hold it whole; a class-wise NMS over the stitched set
    removes the cells kept twice, and detections_per_image is shared out by class as in the RoI heads
    (heads.class_budget).

    Boxes first, masks last: every tile's boxes are found (model.detect, which keeps the tile's features),
    stitched and cut to detections_per_image before the mask head runs (model.segment) on the detections kept,
    each over its own tile's features. It sees detections_per_image boxes an image instead of as many a tile;
    the masks are the same as in one pass; the price is the features of all tiles held at once (about 155 MB a
    1344-px tile at 256 channels, fp32). mask_chunk > 0: the mask head over at most that many detections at once."""
    ys, xs = tile_grid(image.shape[-2:], tile, tile_overlap)
    margin = core_margin(tile, tile_overlap)
    encoded, parts = [], []
    for y0, ycore in zip(ys, tile_cores(ys, tile)):
        for x0, xcore in zip(xs, tile_cores(xs, tile)):
            crop = image[:, y0:y0 + tile, x0:x0 + tile]
            x = resize_image(crop, factor)
            found, features = model.detect([x])
            out = {k: v.detach().cpu() for k, v in found[0].items()}
            out["input_boxes"], out["tile"] = out["boxes"].float(), torch.full_like(out["labels"], len(encoded))
            boxes = resize_boxes(out["input_boxes"], x.shape[-2:], crop.shape[-2:])
            out["boxes"] = boxes + torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
            out["scores"] = out["scores"].float()
            own = tile_owns(out["boxes"], ycore, xcore, margin)
            parts.append({k: v[own] for k, v in out.items()})
            encoded.append(features if own.any() else None)  # a tile that keeps nothing frees its features now
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    keep = batched_nms(out["boxes"], out["scores"], out["labels"], nms_threshold)
    keep = keep[class_budget(out["scores"][keep], out["labels"][keep], detections_per_image, class_reserve)]
    out = {k: v[keep] for k, v in out.items()}
    out["mask_probs"] = tile_masks(model, encoded, out, image.device, mask_chunk)
    return {k: out[k] for k in FIELDS}


def tile_masks(model, encoded, out, device, chunk=0):
    """The mask probabilities of the stitched detections `out`, each from the features of the tile that found
    it (encoded[out['tile']]), on its box in that tile's input (out['input_boxes']); chunk > 0: at most that
    many detections a call of the mask head."""
    where, probs = [], []
    for t in out["tile"].unique().tolist():
        mine = torch.where(out["tile"] == t)[0]
        for part in mine.split(chunk or len(mine)):
            det = {"boxes": out["input_boxes"][part].to(device), "labels": out["labels"][part].to(device)}
            where.append(part)
            probs.append(model.segment(encoded[t], [det])[0]["mask_probs"].detach().float().cpu())
    # no detection at all: none of torchvision's 28 x 28 masks
    return torch.cat(probs)[torch.cat(where).argsort()] if probs else torch.zeros(0, 1, 28, 28)


def tiling(image, opts, scale_mult=1.0):
    """(factor, tile in image pixels or None) of one CxHxW image: the training's sizing rule (dataset.resize_factor
    with the run's MIN_SIZE/MAX_SIZE/SCALE) times scale_mult; a tile where that input would pass MAX_SIZE and
    opts['tile'] is on, else None and the factor shrunk to fit. opts['shrink'] > 1 (predict_or_retry): the same
    factor, tiles of 1/shrink the side of that tile or of the whole image."""
    min_size, max_size, scale = opts["sizing"]
    h, w = image.shape[-2:]
    shrink = opts.get("shrink", 1)
    factor = resize_factor(h, w, min_size, max_size, scale, cap=False) * scale_mult
    if opts["tile"] and max(h, w) * factor > max_size * (1 + 1e-6):
        return factor, int(max_size / factor / shrink)
    return min(factor, max_size / max(h, w)), (int(max(h, w) / shrink) if shrink > 1 else None)


def predict_image(model, image, opts, scale_mult=1.0):
    """One CxHxW image of any size -> detections in its own pixels, resized as `tiling` says: cut into overlapping
    tiles where the input would pass MAX_SIZE (opts['tile']), else shrunk to fit."""
    factor, tile = tiling(image, opts, scale_mult)
    if tile:
        return predict_tiled(model, image, factor, tile, tile_overlap=opts["tile_overlap"],
                             nms_threshold=opts["nms_threshold"], detections_per_image=opts["detections_per_image"],
                             class_reserve=opts["class_reserve"], mask_chunk=opts.get("mask_chunk", 0))
    return forward_resized(model, image, factor)


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


def fuse_detections(outputs, iou_threshold, detections_per_image, class_reserve):
    """Merge the detections of several passes (weighted box and mask fusion; torchvision has only NMS).

    A class-wise box NMS over all passes picks one representative per cell; every detection joins the
    same-class representative it overlaps most (IoU > iou_threshold). A cell's box and 28x28 mask
    probabilities are the score-weighted means of its members' (masks resampled into the fused box);
    its score is the members' score sum over the number of passes, never above its best member's, so
    a cell that one pass of three found scores a third. Every cell is fused before detections_per_image is
    shared out by class (heads.class_budget) on the fused scores, highest first."""
    out = cat_detections(outputs)
    if len(out["boxes"]) == 0:
        return out
    keep = batched_nms(out["boxes"], out["scores"], out["labels"], iou_threshold)
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
    labels = out["labels"][keep]
    order = class_budget(scores, labels, detections_per_image, class_reserve)
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order], "mask_probs": masks[order, None]}


def tta_outputs(model, image, opts):
    """The detections of each test-time pass of opts['tta'] over one image, unfused."""
    h, w = image.shape[-2:]
    return [unflip(predict_image(model, image.flip(dims) if dims else image, opts, mult), dims, h, w)
            for dims, mult in tta_passes(opts["tta"], opts["tta_scales"])]


def predict_members(members, image):
    """Detections of one image by [(model, opts)]: one checkpoint, or several (an ensemble, infer.py
    --checkpoint a.pt,b.pt), each with its own sizing and TTA; all passes (checkpoints x TTA) fused once."""
    outs = [out for model, opts in members for out in tta_outputs(model, image, opts)]
    opts = members[0][1]
    if len(outs) == 1:
        return outs[0]
    return fuse_detections(outs, iou_threshold=opts["nms_threshold"], detections_per_image=opts["detections_per_image"],
                           class_reserve=opts["class_reserve"])


def predict_options(trained, settings):
    """How to predict, from a run's configuration (its sizing rule) and the prediction settings: each setting under
    its name in lower case (DETECTIONS_PER_IMAGE -> opts['detections_per_image']), and 'sizing'."""
    tta_passes(settings["TTA"], settings["TTA_SCALES"])  # refuse an unknown mode now, not after the first image
    return {"sizing": (trained["MIN_SIZE"], trained["MAX_SIZE"], settings["INPUT_SCALE"] or trained["SCALE"]),
            "tta": settings["TTA"], "tta_scales": settings["TTA_SCALES"], "tile": settings["TILE"],
            "tile_overlap": settings["TILE_OVERLAP"], "nms_threshold": settings["NMS_THRESHOLD"],
            "detections_per_image": settings["DETECTIONS_PER_IMAGE"], "class_reserve": settings["CLASS_RESERVE"],
            "mask_threshold": settings["MASK_THRESHOLD"]}


def image_id(meta):
    """The image id of a dataset item's second half: a CellDataset target's index, a TestDataset record's id."""
    return meta["image_id"] if "image_id" in meta else meta["id"]


def image_name(dataset, meta):
    """How messages name a dataset item: a TestDataset record's file name, a CellDataset sample's folder."""
    return meta["file_name"] if "file_name" in meta else dataset.ids[meta["image_id"]]


def free_gpu_memory():
    """What an out-of-memory error left behind: its frames' tensors (collected) and the allocator's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def predict_or_retry(members, image, name):
    """predict_members, and where the GPU runs out of memory: the image again in tiles of 1/2, then 1/4 the input
    side that failed (OOM_TILE_DIVISORS; same resize factor), the mask head OOM_MASK_CHUNK detections at a time,
    each retry said once; then an error naming the image and what to lower (PredictionMemoryError)."""
    factor, tile = tiling(image, members[0][1])
    side = tile or max(image.shape[-2:])  # image pixels of the (first member's, first pass's) input that failed
    where = f"image {name}, {image.shape[-2]}x{image.shape[-1]} px"
    for divisor in [1, *OOM_TILE_DIVISORS]:
        if divisor > 1:
            free_gpu_memory()
            tqdm.write(f"{where}: out of GPU memory at an input of {round(side * factor)} px a side; retrying in "
                       f"tiles of {int(side / divisor)} px (input {round(side / divisor * factor)} px), the mask head "
                       f"{OOM_MASK_CHUNK} detections at a time")
        tried = members if divisor == 1 else [(m, dict(o, shrink=divisor, mask_chunk=OOM_MASK_CHUNK))
                                              for m, o in members]
        try:
            return predict_members(tried, image)
        except torch.cuda.OutOfMemoryError as e:
            error = ". ".join(str(e).split(". ")[:2])  # the message alone: the frames' tensors go with the exception
    free_gpu_memory()
    raise PredictionMemoryError(
        f"{where}: out of GPU memory, also in tiles of {int(side / OOM_TILE_DIVISORS[-1])} px with the mask head "
        f"{OOM_MASK_CHUNK} detections at a time ({error}). Lower infer.py --detections-per-image (validation: "
        "train.py --val-detections-per-image) or --rpn-proposals, predict at a smaller --input-scale, or train "
        "the run with a smaller MAX_SIZE (train.py --max-size); or free the GPU of other processes")


@torch.no_grad()
def predict_each(model, dataset, device, opts, num_workers=0, desc="predict"):
    """The model over a dataset, one image at a time in order, yielding (image id, (H, W), detections) as each is
    done. model and opts may be lists of the same length: an ensemble, whose detections are fused (predict_members)."""
    members = list(zip(model, opts)) if isinstance(model, (list, tuple)) else [(model, opts)]
    for m, _ in members:
        m.eval()
    for images, metas in tqdm(in_order_loader(dataset, num_workers), desc=desc, leave=False, dynamic_ncols=True):
        for image, meta in zip(images, metas):
            name = f"{image_name(dataset, meta)} (id {image_id(meta)})"
            yield image_id(meta), tuple(image.shape[-2:]), predict_or_retry(members, image.to(device), name)


def predict_dataset(model, dataset, device, opts, num_workers=0, desc="predict"):
    """predict_each's detections of every image, as a list: [(image id, (H, W), detections)]."""
    return list(predict_each(model, dataset, device, opts, num_workers, desc))


def to_records(raw, mask_threshold):
    """predict_dataset's [(image id, (H, W), detections)] -> the COCO records of all images (image_records)."""
    return [r for image_id, size, out in raw for r in image_records(out, image_id, mask_threshold, size)]


def in_order_loader(dataset, num_workers=0):
    """One image at a time, in the dataset's order (validation and test)."""
    return torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate,
                                       num_workers=num_workers)
