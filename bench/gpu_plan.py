"""A T4 plan without a T4: training FLOPs a step, inference FLOPs a test image (tiles included) and CPU peak
memory of the recipe's configurations over the real HW3 size distribution, turned into T4 hours by a
throughput calibrated on published figures; `--device cuda` measures the same on the GPU at hand instead.

    python -m bench.gpu_plan                                   # 6 configurations, FLOP counts on the CPU (~20 min, 2 cores)
    python -m bench.gpu_plan --configs scale0-standard --quick # one configuration, fewer representatives
    python -m bench.gpu_plan --device cuda --measure           # the GPU at hand: seconds a step (fp16 autocast +
                                                               # GradScaler via engine.train_step), GPU memory,
                                                               # seconds a test image via predict.predict_image

Configurations: SCALE 0 (the recipe's sizing: MIN_SIZE 800 / MAX_SIZE 1333), SCALE 1 and SCALE 2 (training crops a
random MAX_SIZE/SCALE window of larger images, inference tiles them: predict.tiling), each with HEADS standard and
cascade; backbone seresnextaa101d_32x8d.sw_in12k_ft_in1k_288 with random weights (nothing downloads), FREEZE_BN true
and ROI_BATCH_SIZE 512 as with pretrained weights (train.AUTO_ROI_BATCH_SIZE).

Inputs. Training: the 50 real validation images of assets/hw3-real (sizes and cell counts) stand for the training
set; each becomes a synthetic sample of its size with its number of cells (ellipses of 16-48 px, the classes in the
real shares) that CellDataset (the training data path: dataset.resize_factor, the random MAX_SIZE crop) turns into
the model's input. They are sorted by input area and cut into --buckets groups; the median image of each group is
counted and stands for its group (weight = its share). Inference: every one of the 101 real test sizes goes
through predict.tiling / predict.tile_grid (number and size of tiles); detect() (backbone, RPN, box heads) is
counted at --buckets tile shapes and fitted affine in input area; the mask head is counted per detection.

Assumptions printed with the table:
- A trained RPN puts several proposals on every object; random weights do not. During training each object gets
  --fg-per-object jittered copies of its box among the proposals (the calibration model too), so the mask head
  trains on about as many RoIs as it would in a real run (at most 25% of ROI_BATCH_SIZE).
- Detections a test image: clip(2 x expected cells, 100, DETECTIONS_PER_IMAGE); expected cells = the image's
  area x the real validation images' cells per pixel.
- FlopCounterMode counts convolutions and matrix products (forward and backward); RoIAlign, NMS, anchor matching,
  losses, the optimiser and data loading are not counted: they are inside the calibration's seconds, not ours.
- T4 seconds = counted FLOPs / effective FLOP/s; the effective FLOP/s is what detectron2's R50-FPN Mask R-CNN
  achieved (published seconds per image on a V100) over its FLOPs counted here with torchvision's equivalent model,
  times a published T4/V100 throughput ratio (CALIBRATION below). An ESTIMATE: replace it with --device cuda --measure.
"""
import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
import infer  # noqa: E402
import losses  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from bench.hw3real import TABLE, load_geometry  # noqa: E402
from bench.procmem import in_fresh_process, rss_mb, start_peaks, sync  # noqa: E402
from dataset import CellDataset, resize_image, split_ids  # noqa: E402
from model import build_model, set_thresholds  # noqa: E402

BACKBONE = "seresnextaa101d_32x8d.sw_in12k_ft_in1k_288"
CONFIGS = {f"scale{s:g}-{h}": (float(s), h) for s in (0, 1, 2) for h in ("standard", "cascade")}
HW3_TRAIN_IMAGES = 209  # HW3's training folder (train.py holds VAL_FRACTION of them out for validation)
EPOCHS = 50
SESSION_HOURS = 12.0  # a Kaggle GPU session
DATE = "2026-12-05"

# ---- calibration: published figures -----------------------------------------------------------------------------
CALIBRATION = {
    # detectron2 MODEL_ZOO.md, COCO instance segmentation, mask_rcnn_R_50_FPN_1x (model id 137260431): train time
    # 0.261 s/iter, inference time 0.043 s/im; 8 V100 (Big Basin, NVLink), SOLVER.IMS_PER_BATCH 16 = 2 images a
    # GPU, fp32 (SOLVER.AMP.ENABLED is False by default); training inputs: shorter side one of 640..800 step 32,
    # longer side <= 1333 (Base-RCNN-FPN.yaml); test: shorter side 800; RPN 1000 proposals an image after NMS
    # (POST_NMS_TOPK_TRAIN/TEST), 512 RoIs an image, 100 detections (TEST.DETECTIONS_PER_IMAGE).
    "d2_url": "https://github.com/facebookresearch/detectron2/blob/main/MODEL_ZOO.md",
    "d2_train_s_per_iter": 0.261, "d2_images_per_iter_per_gpu": 2, "d2_infer_s_per_image": 0.043,
    # NVIDIA DeepLearningExamples, PyTorch SE-ResNeXt101-32x4d README, inference throughput at batch 256
    # (pytorch-21.03 NGC container): V100 16GB FP32 508 img/s, T4 mixed precision 527 img/s, T4 FP32 158 img/s.
    # The nearest published T4 vs V100 figures of one network (a relative of our backbone) on one software stack;
    # they are inference throughputs (no published T4 training figure was found), used for training too.
    "nv_url": "https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/ConvNets/"
              "se-resnext101-32x4d/README.md",
    "v100_fp32_img_s": 508.0, "t4_amp_img_s": 527.0, "t4_fp32_img_s": 158.0,
    "train_size": (720, 960),  # a 4:3 COCO image at the RMS of 640..800 (722): detectron2's mean training input
    "infer_size": (800, 1067),
    "objects": 7,  # COCO train2017: about 7.3 instances an image
}


def t4_rates(train_flops_per_image, infer_flops_per_image, cal=CALIBRATION):
    """Effective T4 FLOP/s (training under fp16 autocast, inference in fp32) from the calibration model's counted
    FLOPs an image and the published figures: V100 FLOP/s = FLOPs / published seconds an image, times the T4/V100
    throughput ratio of the same precision pairing (T4 AMP / V100 FP32 for training, T4 FP32 / V100 FP32 for
    inference; detectron2's V100 figures are fp32)."""
    v100_train = train_flops_per_image / (cal["d2_train_s_per_iter"] / cal["d2_images_per_iter_per_gpu"])
    v100_infer = infer_flops_per_image / cal["d2_infer_s_per_image"]
    return {"v100_train": v100_train, "v100_infer": v100_infer,
            "train": v100_train * cal["t4_amp_img_s"] / cal["v100_fp32_img_s"],
            "infer": v100_infer * cal["t4_fp32_img_s"] / cal["v100_fp32_img_s"]}


def estimate_seconds(flops, flops_per_second):
    """The estimate: counted FLOPs over the effective throughput."""
    return flops / flops_per_second


# ---- configuration and model ------------------------------------------------------------------------------------
def recipe_cfg(scale, heads, **overrides):
    """train.py's constants, then the recipe's choices for pretrained weights (random here: nothing downloads)."""
    cfg = {name: getattr(train, name) for name, _, _ in train.CONFIG}
    cfg.update(BACKBONE=BACKBONE, PRETRAINED=False, PRETRAINED_WEIGHTS="", FREEZE_BN=True, FPN_CHANNELS=256,
               ROI_BATCH_SIZE=train.AUTO_ROI_BATCH_SIZE["pretrained"], MIN_SIZE=800, MAX_SIZE=1333,
               SCALE=float(scale), HEADS=heads, LR=train.AUTO_LR["pretrained"])
    cfg.update(overrides)
    return cfg


def emulate_trained_rpn(model, per_object, seed=0):
    """During training, replace some of the RPN's proposals with `per_object` jittered copies of each ground-truth
    box (each corner moved by up to 8% of the box's side: IoU >= 0.5), at most half the proposals: what a trained
    RPN gives, so the RoI heads sample as many cells (and the mask head trains on as many RoIs) as in a real run.
    Random weights alone give the ground-truth boxes only. Inference is untouched."""
    rpn, forward = model.rpn, model.rpn.forward
    gen = torch.Generator().manual_seed(seed)

    def wrapped(images, features, targets=None):
        boxes, rpn_losses = forward(images, features, targets)
        if not rpn.training or targets is None or per_object <= 0:
            return boxes, rpn_losses
        out = []
        for b, t in zip(boxes, targets):
            gt = t["boxes"].float()
            k = min(len(gt) * per_object, len(b) // 2)
            if k == 0:
                out.append(b)
                continue
            pick = gt.repeat(per_object, 1)[torch.randperm(len(gt) * per_object, generator=gen)[:k].to(gt.device)]
            wh = (pick[:, 2:] - pick[:, :2]).repeat(1, 2)
            noise = (torch.rand(pick.shape, generator=gen).to(gt.device) * 0.16 - 0.08) * wh
            out.append(torch.cat([b[:len(b) - k], (pick + noise).to(b.dtype)]))
        return out, rpn_losses

    rpn.forward = wrapped
    return model


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs):
    """A convolution's backward: each of grad input and grad weight costs what the forward costs. torch's own formula
    (torch 2.x) builds the transposed weight without the groups and counts a grouped convolution's backward `groups`
    times too high (a 32-group 3x3 conv: 34x its forward instead of 3x), which would double a ResNeXt's step."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flops_of(fn):
    """(FLOPs that FlopCounterMode counts while fn() runs, fn's result); grouped convolutions' backward corrected."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}) as counter:
        result = fn()
    return counter.get_total_flops(), result


def new_optimizer(model, lr=5e-5):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-3)


def train_step_flops(model, image, target, weights, optimizer=None):
    """FLOPs of one training step (engine.train_step: forward, backward, clipping, AdamW) and the mask head's RoIs."""
    model.train()
    optimizer = optimizer or new_optimizer(model)
    rois = []
    hook = model.roi_heads.mask_head.register_forward_hook(lambda m, i, o: rois.append(int(o.shape[0])))
    try:
        flops, (loss, _) = flops_of(lambda: engine.train_step(model, [image], [dict(target)], optimizer, weights,
                                                              grad_clip=10.0, step=1))
    finally:
        hook.remove()
    return flops, sum(rois)


@torch.no_grad()
def detect_flops(model, shape, device="cpu"):
    """FLOPs of detect() (backbone, RPN, box heads: everything of inference but the mask head) on one input."""
    model.eval()
    x = torch.rand(3, *shape, device=device)
    flops, (found, _) = flops_of(lambda: model.detect([x]))
    return flops


@torch.no_grad()
def mask_flops_per_detection(model, shape, n=100, device="cpu"):
    """FLOPs of segment() (the mask head) per detection, from n boxes of 12-40 px on one input."""
    model.eval()
    x = torch.rand(3, *shape, device=device)
    _, encoded = model.detect([x])
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * (torch.tensor(shape[::-1], dtype=torch.float32) - 40)
    boxes = torch.cat([xy, xy + 12 + 28 * torch.rand(n, 2, generator=g)], 1).to(device)
    det = {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64, device=device)}
    flops, _ = flops_of(lambda: model.segment(encoded, [det]))
    return flops / n


# ---- the real size distribution ---------------------------------------------------------------------------------
def val_images():
    """[(height, width, cells)] of the 50 real validation images (assets/hw3-real)."""
    coco = load_geometry()
    count = {}
    for a in coco["annotations"]:
        count[a["image_id"]] = count.get(a["image_id"], 0) + 1
    return [(im["height"], im["width"], count.get(im["id"], 0)) for im in sorted(coco["images"], key=lambda i: i["id"])]


def test_sizes():
    import json
    return [(r["height"], r["width"]) for r in json.loads(TABLE.read_text())]


def cells_per_pixel(images):
    return sum(c for _, _, c in images) / sum(h * w for h, w, _ in images)


CLASS_SHARES = (0.26, 0.69, 0.028, 0.019)


def write_sample(root, name, height, width, cells, seed=0):
    """DATA_DIR/train/<name>: an RGB image of height x width with `cells` non-overlapping elliptic cells of 16-48 px
    (jittered grid), classes drawn in the real shares; class<k>.tif label maps as the course's."""
    import tifffile
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (205, 185, 215)
    labels = np.zeros((4, height, width), np.float64)
    if cells:
        cols = max(1, math.ceil(math.sqrt(cells * width / height)))
        rows = math.ceil(cells / cols)
        while rows * cols < cells:
            cols += 1
        py, px = height / rows, width / cols
        slots = rng.permutation(rows * cols)[:cells]
        yy, xx = np.ogrid[:height, :width]
        for i, s in enumerate(slots, start=1):
            r, c = divmod(int(s), cols)
            ry = min(rng.uniform(8, 24), py / 2 - 0.5)
            rx = min(rng.uniform(8, 24), px / 2 - 0.5)
            cy, cx = (r + 0.5) * py, (c + 0.5) * px
            y0, y1 = int(max(cy - ry - 1, 0)), int(min(cy + ry + 2, height))
            x0, x1 = int(max(cx - rx - 1, 0)), int(min(cx + rx + 2, width))
            inside = ((yy[y0:y1] - cy) / max(ry, 0.5)) ** 2 + ((xx[:, x0:x1] - cx) / max(rx, 0.5)) ** 2 <= 1
            if not inside.any():
                inside[(y1 - y0) // 2, (x1 - x0) // 2] = True
            k = rng.choice(4, p=np.array(CLASS_SHARES) / sum(CLASS_SHARES))
            labels[k, y0:y1, x0:x1][inside] = i
            image[y0:y1, x0:x1][inside] = (75 + 30 * k, 40 + 20 * k, 30 + 40 * k)
    folder = Path(root) / "train" / name
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "image.tif", image)
    for k in range(4):
        if labels[k].any():
            tifffile.imwrite(folder / f"class{k + 1}.tif", labels[k])
    return folder


def write_samples(root, images):
    """One synthetic training sample per (height, width, cells): names s00, s01, ..."""
    names = []
    for i, (h, w, n) in enumerate(images):
        write_sample(root, f"s{i:02d}", h, w, n, seed=i)
        names.append(f"s{i:02d}")
    return names


def train_item(root, names, index, cfg, seed=0):
    """CellDataset's training item (the path train.py runs: sizing rule, random crop, augmentation, masks)."""
    torch.manual_seed(seed + index)
    ds = CellDataset(root, names, train=True, sizing=(cfg["MIN_SIZE"], cfg["MAX_SIZE"], cfg["SCALE"]),
                     to_gray=cfg["TO_GRAY"])
    return ds[index]


def buckets(values, k):
    """Indices sorted by value, cut into k groups of (nearly) equal size: [(representative = the median member,
    members)]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    groups = [g for g in np.array_split(np.array(order), min(k, len(order))) if len(g)]
    return [(int(g[len(g) // 2]), [int(i) for i in g]) for g in groups]


def train_inputs(root, names, cfg):
    """[(input (H, W), instances)] of every sample under cfg's sizing, as CellDataset makes them."""
    out = []
    for i in range(len(names)):
        image, target = train_item(root, names, i, cfg)
        out.append((tuple(image.shape[-2:]), len(target["labels"])))
    return out


def test_plan(sizes, opts):
    """Per test image (H, W): (number of tiles, model input (h, w) of each tile or of the whole image), from
    predict.tiling and predict.tile_grid (the code infer.py runs) and dataset.resize_image's output size."""
    plan = []
    for h, w in sizes:
        image = torch.empty(3, h, w)
        factor, tile = predict.tiling(image, opts)
        if tile:
            ys, xs = predict.tile_grid((h, w), tile, opts["tile_overlap"])
            crop = torch.zeros(3, min(tile, h), min(tile, w))
            plan.append((len(ys) * len(xs), tuple(resize_image(crop, factor).shape[-2:])))
        else:
            plan.append((1, tuple(resize_image(torch.zeros(3, h, w), factor).shape[-2:])))
    return plan


def detections_per_image(sizes, density, limit):
    return [int(min(limit, max(100, round(2 * density * h * w)))) for h, w in sizes]


def affine_fit(xs, ys):
    """(a, b) of y = a + b x, least squares (b only through the origin where all x are equal)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(set(xs.tolist())) < 2:
        return 0.0, float(ys.mean() / xs.mean())
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)


# ---- the calibration model --------------------------------------------------------------------------------------
def calibration_model(post_nms_train=1000):
    """torchvision's Mask R-CNN R50-FPN, detectron2's mask_rcnn_R_50_FPN_1x in its parts: FrozenBN-like frozen stem
    and res2 (trainable_backbone_layers 3 = detectron2 FREEZE_AT 2), 80 classes + background, 1000 proposals an
    image in training, 512 RoIs, 100 detections."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81, trainable_backbone_layers=3,
                                 rpn_post_nms_top_n_train=post_nms_train, box_batch_size_per_image=512,
                                 box_score_thresh=0.0, box_detections_per_img=100)


def coco_like_target(height, width, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = 32 + 268 * torch.rand(n, 2, generator=g)
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - side)
    boxes = torch.cat([xy, xy + side], 1)
    masks = torch.zeros(n, height, width, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    return {"boxes": boxes, "labels": torch.randint(1, 81, (n,), generator=g), "masks": masks}


def calibrate(fg_per_object, log=print):
    """Counted FLOPs of the calibration model: one training image (of a 2-image step) and one inference image."""
    torch.manual_seed(0)
    cal = CALIBRATION
    model = emulate_trained_rpn(calibration_model(), fg_per_object)
    model.transform.min_size, model.transform.max_size = (cal["train_size"][0],), 1333
    image = torch.rand(3, *cal["train_size"])
    target = coco_like_target(*cal["train_size"], cal["objects"])
    t0 = time.perf_counter()
    train_flops, rois = train_step_flops(model, image, target, losses.preset_weights("stock"))
    model.eval()
    model.transform.min_size = (cal["infer_size"][0],)
    x = torch.rand(3, *cal["infer_size"])
    with torch.no_grad():
        infer_flops, out = flops_of(lambda: model([x]))
    log(f"calibration model (torchvision Mask R-CNN R50-FPN, random weights): training "
        f"{train_flops / 1e9:.0f} GFLOPs an image at {cal['train_size'][0]}x{cal['train_size'][1]} ({cal['objects']} "
        f"objects, {rois} mask RoIs); inference {infer_flops / 1e9:.0f} GFLOPs at {cal['infer_size'][0]}x"
        f"{cal['infer_size'][1]} ({len(out[0]['boxes'])} detections) [{time.perf_counter() - t0:.0f} s]")
    return train_flops, infer_flops


# ---- FLOP counting per configuration ----------------------------------------------------------------------------
def count_config(name, cfg, root, names, tests, args, log=print):
    """Training FLOPs a step (bucket-weighted mean over the samples), inference FLOPs of every test size."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = emulate_trained_rpn(build_model(cfg, load_pretrained=False), args.fg_per_object)
    weights = losses.preset_weights(cfg["LOSSES"], cfg["LOSS_WEIGHTS"])
    inputs = train_inputs(root, names, cfg)
    groups = buckets([h * w for (h, w), _ in inputs], args.buckets)
    reps = []
    for rep, members in groups:
        image, target = train_item(root, names, rep, cfg)
        flops, rois = train_step_flops(model, image, target, weights)
        reps.append({"index": rep, "input": tuple(image.shape[-2:]), "cells": len(target["labels"]), "rois": rois,
                     "flops": flops, "weight": len(members) / len(inputs)})
        del image, target
    train_flops = sum(r["flops"] * r["weight"] for r in reps)
    settings = infer.prediction_settings()
    set_thresholds(model, settings)
    opts = predict.predict_options(cfg, settings)
    plan = test_plan(tests, opts)
    areas = [h * w for _, (h, w) in plan]
    shapes = sorted({plan[rep][1] for rep, _ in buckets(areas, args.buckets)}, key=lambda s: s[0] * s[1])
    counted = [(s[0] * s[1], detect_flops(model, s)) for s in shapes]
    a, b = affine_fit(*zip(*counted))
    per_det = mask_flops_per_detection(model, shapes[len(shapes) // 2])
    dets = detections_per_image(tests, args.density, settings["DETECTIONS_PER_IMAGE"])
    test_flops = [n * (a + b * h * w) + d * per_det for (n, (h, w)), d in zip(plan, dets)]
    log(f"{name}: train inputs counted " + ", ".join(
        f"{r['input'][0]}x{r['input'][1]} ({r['cells']} cells, {r['rois']} mask RoIs, weight {r['weight']:.2f}): "
        f"{r['flops'] / 1e9:.0f} GFLOPs" for r in reps)
        + "; detect() counted at " + ", ".join(f"{s[0]}x{s[1]}: {f / 1e9:.0f}" for s, (_, f) in zip(shapes, counted))
        + f" GFLOPs; mask head {per_det / 1e9:.2f} GFLOPs a detection; test tiles {sum(n for n, _ in plan)} "
          f"[{time.perf_counter() - t0:.0f} s]")
    largest = max(range(len(inputs)), key=lambda i: inputs[i][0][0] * inputs[i][0][1])
    median = sorted(range(len(inputs)), key=lambda i: inputs[i][0][0] * inputs[i][0][1])[len(inputs) // 2]
    return {"train_flops": train_flops, "reps": reps, "test_flops": test_flops, "plan": plan, "dets": dets,
            "median_input": inputs[median][0], "largest_input": inputs[largest][0], "largest_index": largest}


def memory_child(cfg, root, names, index, fg_per_object, queue):
    """Peak host memory (VmHWM above the level once the model is built and the item made) of one training step."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = emulate_trained_rpn(build_model(cfg, load_pretrained=False), fg_per_object)
    model.train()
    image, target = train_item(root, names, index, cfg)
    optimizer = new_optimizer(model)
    weights = losses.preset_weights(cfg["LOSSES"], cfg["LOSS_WEIGHTS"])
    base = start_peaks(False)
    t = time.perf_counter()
    engine.train_step(model, [image], [dict(target)], optimizer, weights, grad_clip=cfg["GRAD_CLIP"], step=1)
    queue.put({"host_mb": rss_mb("VmHWM") - base, "step_s": time.perf_counter() - t,
               "input": tuple(image.shape[-2:])})


# ---- measuring on a device --------------------------------------------------------------------------------------
def measure_config(name, cfg, root, names, tests, args, log=print):
    """Seconds a training step (engine.train_step under the AMP rule, after warm-up), peak GPU memory, seconds a test
    image (predict.predict_image, fp32), at the bucket representatives; bucket-weighted means."""
    device = torch.device(args.device)
    dtype, why = engine.amp_dtype(args.amp, device)
    torch.manual_seed(0)
    model = emulate_trained_rpn(build_model(cfg, load_pretrained=False), args.fg_per_object).to(device)
    weights = losses.preset_weights(cfg["LOSSES"], cfg["LOSS_WEIGHTS"])
    optimizer = new_optimizer(model, cfg["LR"])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    inputs = train_inputs(root, names, cfg)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reps, step = [], 0
    for rep, members in buckets([h * w for (h, w), _ in inputs], args.buckets):
        image, target = train_item(root, names, rep, cfg)
        image = image.to(device)
        target = {k: v.to(device) for k, v in target.items() if torch.is_tensor(v)}
        model.train()
        times = []
        for i in range(args.warmup + args.steps):
            sync(device)
            t = time.perf_counter()
            step += 1
            engine.train_step(model, [image], [dict(target)], optimizer, weights, scaler=scaler, dtype=dtype,
                              grad_clip=cfg["GRAD_CLIP"], step=step)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        reps.append({"input": tuple(image.shape[-2:]), "cells": len(target["labels"]), "s": statistics.mean(times),
                     "weight": len(members) / len(inputs)})
    gpu = ((torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30)
           if device.type == "cuda" else (float("nan"), float("nan")))
    settings = infer.prediction_settings(**getattr(args, "prediction", {}))  # tests: fewer detections
    set_thresholds(model, settings)
    opts = predict.predict_options(cfg, settings)
    plan = test_plan(tests, opts)
    model.eval()
    test_s = 0.0
    with torch.no_grad():
        for rep, members in buckets([n * h * w for n, (h, w) in plan], args.buckets):
            image = torch.rand(3, *tests[rep], device=device)
            predict.predict_image(model, image, opts)  # warm-up at this size
            sync(device)
            t = time.perf_counter()
            predict.predict_image(model, image, opts)
            sync(device)
            test_s += (time.perf_counter() - t) * len(members)
    log(f"{name}: {why}; steps " + ", ".join(f"{r['input'][0]}x{r['input'][1]} ({r['cells']} cells): {r['s']:.2f} s"
                                             for r in reps)
        + (f"; peak GPU allocated {gpu[0]:.2f} GB, reserved {gpu[1]:.2f} GB" if device.type == "cuda" else ""))
    return {"step_s": sum(r["s"] * r["weight"] for r in reps), "test_s_per_image": test_s / len(tests),
            "gpu_gb": gpu, "reps": reps}


# ---- the plan ---------------------------------------------------------------------------------------------------
def epoch_split(n_images=HW3_TRAIN_IMAGES):
    train_ids, val_ids = split_ids([f"{i:03d}" for i in range(n_images)], train.VAL_FRACTION, train.SPLIT_SEED)
    return len(train_ids), len(val_ids)


def session_epochs(epoch_h, test_h, session_h=SESSION_HOURS):
    """Whole epochs that fit a session with the test-set prediction inside it."""
    return max(0, math.floor((session_h - test_h) / epoch_h)) if epoch_h > 0 else 0


def plan_row(name, step_s, test_s_per_image, n_test, n_train, n_val):
    """(s/step, min/epoch, h for EPOCHS epochs, h for the test set, epochs in a session): an epoch is n_train steps
    and n_val validation predictions (a val image costed as a mean test image)."""
    epoch_min = (n_train * step_s + n_val * test_s_per_image) / 60
    test_h = n_test * test_s_per_image / 3600
    return {"name": name, "step_s": step_s, "epoch_min": epoch_min, "run_h": EPOCHS * epoch_min / 60,
            "test_h": test_h, "session_epochs": session_epochs(epoch_min / 60, test_h)}


def format_table(rows):
    head = ("| configuration | input px (median / largest) | train GFLOPs/step | {s} s/step | {s} min/epoch | "
            "{s} h for 50 epochs | test GFLOPs/image (tiles incl.) | {s} h test set | CPU peak GB | "
            "epochs in 12 h |").format(s=rows[0].get("kind", "est."))
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in rows:
        lines.append(f"| {r['name']} | {r['inputs']} | {r['train_gflops']} | {r['step_s']:.2f} | {r['epoch_min']:.1f} | "
                     f"{r['run_h']:.1f} | {r['test_gflops']} | {r['test_h']:.2f} | {r['mem']} | {r['session_epochs']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--measure", action="store_true", help="time steps and test images on --device instead of "
                    "counting FLOPs (the default with --device cuda)")
    ap.add_argument("--amp", default="auto", help="--measure: train.py's AMP rule (auto: fp16 on a T4, off on the CPU)")
    ap.add_argument("--buckets", type=int, default=3, help="representative inputs a configuration (train and test)")
    ap.add_argument("--quick", action="store_true", help="2 representatives, memory of the first configuration only")
    ap.add_argument("--memory", default="standard", choices=["standard", "all", "none"],
                    help="CPU peak memory of one step at the largest input: standard-head configurations (cascade "
                         "adds little), all, or none")
    ap.add_argument("--fg-per-object", type=int, default=8, help="jittered proposals per object (trained-RPN stand-in)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backbone", default=BACKBONE, help="timm name (tests: test_resnet)")
    ap.add_argument("--fpn-channels", type=int, default=256)
    ap.add_argument("--max-images", type=int, default=0, help="use only this many of the 50 training stand-ins and "
                    "of the 101 test sizes, shrunk by --shrink (tests)")
    ap.add_argument("--shrink", type=float, default=1.0, help="divide every image side by this (tests)")
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        args.measure = True
    if args.quick:
        args.buckets = min(args.buckets, 2)
    names_wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(names_wanted) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(torch.get_num_threads())

    images = val_images()
    tests = test_sizes()
    args.density = cells_per_pixel(images)
    if args.max_images:
        images = [images[i] for i in np.linspace(0, len(images) - 1, args.max_images).round().astype(int)]
        tests = [tests[i] for i in np.linspace(0, len(tests) - 1, args.max_images).round().astype(int)]
    if args.shrink != 1.0:
        images = [(max(8, int(h / args.shrink)), max(8, int(w / args.shrink)), c) for h, w, c in images]
        tests = [(max(8, int(h / args.shrink)), max(8, int(w / args.shrink))) for h, w in tests]
    n_train, n_val = epoch_split()
    over = dict(BACKBONE=args.backbone, FPN_CHANNELS=args.fpn_channels, MIN_SIZE=args.min_size, MAX_SIZE=args.max_size)
    device_name = (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
                   else f"{torch.get_num_threads()}-thread CPU")
    print(f"bench.gpu_plan  {DATE}  torch {torch.__version__}  device: {device_name} "
          + ("(measured)" if args.measure else "(FLOP counts; T4 time = ESTIMATE)"))
    print(f"data: {len(images)} training stand-ins (real val sizes, cells {min(c for *_, c in images)}-"
          f"{max(c for *_, c in images)}), {len(tests)} test sizes; an epoch = {n_train} steps + {n_val} val images "
          f"({HW3_TRAIN_IMAGES} HW3 training images, VAL_FRACTION {train.VAL_FRACTION}); backbone {args.backbone}, "
          f"random weights; {args.buckets} representatives a configuration")
    rows, cal_rates = [], None
    with tempfile.TemporaryDirectory() as root:
        names = write_samples(root, images)
        if not args.measure:
            cal_train, cal_infer = calibrate(args.fg_per_object)
            cal_rates = t4_rates(cal_train, cal_infer)
        memory_done = False
        for name in names_wanted:
            scale, heads = CONFIGS[name]
            cfg = recipe_cfg(scale, heads, **over)
            if args.measure:
                m = measure_config(name, cfg, root, names, tests, args)
                row = plan_row(name, m["step_s"], m["test_s_per_image"], len(tests), n_train, n_val)
                inputs = train_inputs(root, names, cfg)
                areas = sorted(inputs, key=lambda x: x[0][0] * x[0][1])
                row.update(kind="measured", train_gflops="-", test_gflops="-",
                           inputs=f"{areas[len(areas) // 2][0][0]}x{areas[len(areas) // 2][0][1]} / "
                                  f"{areas[-1][0][0]}x{areas[-1][0][1]}",
                           mem=(f"GPU {m['gpu_gb'][0]:.1f} alloc / {m['gpu_gb'][1]:.1f} resv"
                                if args.device.startswith("cuda") else "-"))
                rows.append(row)
                continue
            c = count_config(name, cfg, root, names, tests, args)
            step_s = estimate_seconds(c["train_flops"], cal_rates["train"])
            test_s = estimate_seconds(statistics.mean(c["test_flops"]), cal_rates["infer"])
            row = plan_row(name, step_s, test_s, len(tests), n_train, n_val)
            mem = "-"
            if args.memory == "all" or (args.memory == "standard" and heads == "standard"):
                if not (args.quick and memory_done):
                    r = in_fresh_process(memory_child, cfg, root, names, c["largest_index"], args.fg_per_object)
                    mem = (f"{r['host_mb'] / 1024:.1f} ({r['input'][0]}x{r['input'][1]})" if r
                           else "failed (out of memory?)")
                    memory_done = True
                    if r:
                        print(f"{name}: CPU step at {r['input'][0]}x{r['input'][1]}: {r['step_s']:.0f} s, peak host "
                              f"+{r['host_mb'] / 1024:.2f} GB")
            (mh, mw), (lh, lw) = c["median_input"], c["largest_input"]
            row.update(kind="est.", inputs=f"{mh}x{mw} / {lh}x{lw}", train_gflops=f"{c['train_flops'] / 1e9:.0f}",
                       test_gflops=f"{statistics.mean(c['test_flops']) / 1e9:.0f}", mem=mem)
            rows.append(row)
    print()
    print(format_table(rows))
    print()
    if cal_rates:
        cal = CALIBRATION
        print(f"ESTIMATE, not a T4 measurement. Effective T4 throughput: training {cal_rates['train'] / 1e12:.2f} "
              f"TFLOP/s (fp16 autocast), inference {cal_rates['infer'] / 1e12:.2f} TFLOP/s (fp32).")
        print(f"  calibration: detectron2 mask_rcnn_R_50_FPN_1x trains at {cal['d2_train_s_per_iter']} s/iter, "
              f"{cal['d2_images_per_iter_per_gpu']} images a V100 (8 V100, batch 16, fp32), infers at "
              f"{cal['d2_infer_s_per_image']} s/image; its FLOPs counted here (torchvision R50-FPN Mask R-CNN, "
              f"{cal['train_size'][0]}x{cal['train_size'][1]} training, {cal['infer_size'][0]}x{cal['infer_size'][1]}"
              f" inference) give V100 {cal_rates['v100_train'] / 1e12:.2f} / {cal_rates['v100_infer'] / 1e12:.2f} "
              f"TFLOP/s. Source: {cal['d2_url']}")
        print(f"  T4/V100: T4 mixed precision {cal['t4_amp_img_s']:.0f} img/s and T4 FP32 {cal['t4_fp32_img_s']:.0f} "
              f"img/s against V100 FP32 {cal['v100_fp32_img_s']:.0f} img/s (SE-ResNeXt101-32x4d, PyTorch, batch 256, "
              f"inference: no published T4 training figure found) -> x{cal['t4_amp_img_s'] / cal['v100_fp32_img_s']:.2f}"
              f" training, x{cal['t4_fp32_img_s'] / cal['v100_fp32_img_s']:.2f} inference. Source: {cal['nv_url']}")
        print("  Assumes our model reaches the same share of the GPU as the calibration model; RoIAlign, NMS, anchor "
              "matching, losses, AdamW and data loading are not counted (FlopCounterMode counts convolutions and "
              "matrix products); a T4 under sustained load may clock lower than in a short benchmark.")
    print(f"  trained-RPN stand-in: {args.fg_per_object} jittered proposals per object in training; detections a test "
          f"image: clip(2 x expected cells, 100, {infer.DETECTIONS_PER_IMAGE}) with {args.density * 1e6:.0f} cells a "
          f"megapixel (real val images){'; measured with random weights: up to the limit of detections' if args.measure else ''}.")
    print(f"  training FLOPs: {args.buckets} representative inputs a configuration (the median image of each input-area "
          f"group of the training stand-ins), weighted by group size; test: detect() at {args.buckets} tile shapes, "
          f"affine in area, over all {len(tests)} test sizes and their tiles.")
    if not args.measure:
        print("  CPU peak memory: host RSS above the level with the model built and the image loaded, one fp32 step "
              "(incl. AdamW state) at the largest training input; an upper bound for fp16 GPU memory (fp32 on the "
              "CPU); '-' = not measured" + (" (cascade: adds little over standard)" if args.memory == "standard" else ""))
    print(f"  epochs in {SESSION_HOURS:.0f} h: whole epochs of the training that fit a {SESSION_HOURS:.0f}-hour Kaggle "
          f"session with the test-set prediction inside it (model build, data and checkpoint writes not counted).")
    return rows


if __name__ == "__main__":
    main()
