"""Training step: the report's configuration (ours) vs torchvision's stock Mask R-CNN path, same
image, same instances, one run.

    python -m bench.step_memory                                  # CPU: resnet18 backbones, fp32
    python -m bench.step_memory --device cuda --amp fp16 \\
        --backbone seresnextaa101d_32x8d.sw_in12k_ft_in1k_288 --stock-backbone resnet50   # T4-like

The input is the hardest training image of HW3's kind: 1731 x 2162 px (the largest training image)
holding 772 cells (the most in one image), the cells being real cell masks taken from
assets/hw3-real/val_geometry_coco.json.gz and placed without overlap.

- ours: train.py's path: CellDataset resizes the image and its 4 label maps to the input size (MIN_SIZE
  800 / MAX_SIZE 1333) and makes the masks there, once, as uint8; the model does not resize; report
  losses (focal, CIoU, Dice, boundary), per-RoI mask targets.
- stock: what torchvision's references/detection do: the full-size image and uint8 masks from the dataset,
  GeneralizedRCNNTransform resizes them as one float32 N x H x W tensor, stock losses (the mask
  targets roi_align another float32 copy of all masks); torchvision's resnet FPN backbone.

Each side runs in a fresh process: data seconds, step seconds (engine.train_step, the step train.py runs:
forward + backward + AdamW, ours with train.py's GRAD_CLIP, stock unclipped as torchvision's references;
mean after a warm-up step), peak host memory above the process's level after imports, peak GPU memory
(allocator), bytes of the masks handed to the model. Last line: the ours/stock ratios.
"""
import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import engine
import losses
import train
from bench.hw3real import load_geometry
from bench.procmem import in_fresh_process, rss_mb, start_peaks
from dataset import CellDataset, instances_from_labels, read_image, read_label_maps, to_tensor
from model import build_model


def make_sample(root, height, width, n, seed=0):
    """DATA_DIR/train/big with n real cell masks (classes kept) placed without overlap on a height x width image."""
    import tifffile
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(seed)
    anns = load_geometry()["annotations"]
    labels = np.zeros((height, width, 4), np.float32)
    taken = np.zeros((height, width), bool)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (205, 185, 215)
    colours = {1: (75, 40, 30), 2: (135, 85, 55), 3: (120, 80, 160), 4: (60, 60, 60)}
    placed, tries = 0, 0
    while placed < n and tries < 100 * n:
        tries += 1
        ann = anns[rng.integers(len(anns))]
        rle = ann["segmentation"]
        full = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode() if isinstance(rle["counts"], str)
                                  else rle["counts"]}).astype(bool)
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        cell = full[y:y + h, x:x + w]
        if cell.size == 0 or h >= height or w >= width or not cell.any():
            continue
        y0, x0 = rng.integers(0, height - h), rng.integers(0, width - w)
        if taken[y0:y0 + h, x0:x0 + w][cell].any():
            continue
        placed += 1
        taken[y0:y0 + h, x0:x0 + w] |= cell
        labels[y0:y0 + h, x0:x0 + w, ann["category_id"] - 1][cell] = placed
        image[y0:y0 + h, x0:x0 + w][cell] = colours[ann["category_id"]]
    folder = Path(root) / "train" / "big"
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / "image.tif", image)
    for k in range(4):
        if labels[..., k].any():
            tifffile.imwrite(folder / f"class{k + 1}.tif", labels[..., k].astype(np.float64))
    return placed


def run_one(kind, args, data_dir, queue):
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if kind == "ours":
        cfg = {name: getattr(train, name) for name, _, _ in train.CONFIG}  # train.py's constants, then:
        cfg.update(BACKBONE=args.backbone, PRETRAINED=False, PRETRAINED_WEIGHTS="", FREEZE_BN=True,  # the recipe's
                   FPN_CHANNELS=256, ROI_BATCH_SIZE=train.AUTO_ROI_BATCH_SIZE["pretrained"],  # frozen BN, 512 RoIs
                   MIN_SIZE=args.min_size, MAX_SIZE=args.max_size, SCALE=args.scale, LOSSES="report")  # (random weights)
        model = build_model(cfg, load_pretrained=False).to(device)
        weights, grad_clip = losses.preset_weights("report"), cfg["GRAD_CLIP"]  # train.py's step, clipping included
    else:
        if args.stock_backbone == "resnet50":
            model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5,
                                          min_size=args.min_size, max_size=args.max_size)
        else:
            model = MaskRCNN(resnet_fpn_backbone(backbone_name=args.stock_backbone, weights=None), num_classes=5,
                             min_size=args.min_size, max_size=args.max_size)
        model = model.to(device)
        weights, grad_clip = losses.preset_weights("stock"), 0.0  # torchvision's references do not clip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=1e-3)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    base = start_peaks(device.type == "cuda")
    t0 = time.perf_counter()
    if kind == "ours":
        image, target = CellDataset(data_dir, ["big"], train=True, sizing=(args.min_size, args.max_size, args.scale))[0]
    else:  # torchvision's reference datasets hand over full-size masks; the model resizes them
        folder = Path(data_dir) / "train" / "big"
        rgb = read_image(folder / "image.tif")
        masks, classes, boxes = instances_from_labels(read_label_maps(folder, rgb.shape))
        image = to_tensor(rgb)
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(classes), "masks": torch.from_numpy(masks)}
    data_s = time.perf_counter() - t0
    mask_mb = target["masks"].numel() * target["masks"].element_size() / 2**20
    image = image.to(device)
    target = {k: v.to(device) for k, v in target.items() if torch.is_tensor(v)}
    model.train()
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = engine.train_step(model, [image], [dict(target)], optimizer, weights, scaler=scaler, dtype=dtype,
                                    grad_clip=grad_clip, step=step + 1)
        if loss is None:
            raise FloatingPointError(f"{kind}: non-finite loss at step {step}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    queue.put({"data_s": data_s, "step_s": float(np.mean(times)), "host_mb": rss_mb("VmHWM") - base,
               "gpu_mb": gpu_mb, "mask_mb": mask_mb, "instances": len(target["labels"]),
               "input": list(image.shape[-2:])})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"])
    ap.add_argument("--cudnn-benchmark", action="store_true", help="CUDA: torch.backends.cudnn.benchmark on "
                    "(train.py's CUDNN_BENCHMARK; off by default there)")
    ap.add_argument("--backbone", default="resnet18", help="ours: a timm model name")
    ap.add_argument("--stock-backbone", default="resnet18", help="stock: torchvision resnet FPN (resnet50 = maskrcnn_resnet50_fpn)")
    ap.add_argument("--height", type=int, default=1731)
    ap.add_argument("--width", type=int, default=2162)
    ap.add_argument("--instances", type=int, default=772)
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--scale", type=float, default=0.0, help="ours: SCALE (2.0: a random 666-px crop at 2x)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", choices=["ours", "stock"], help="measure one side only")
    args = ap.parse_args()
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        placed = make_sample(tmp, args.height, args.width, args.instances)
        print(f"device: {device_name}; torch {torch.__version__}; AMP {args.amp}; cudnn.benchmark {args.cudnn_benchmark}; image {args.height}x{args.width}, "
              f"{placed} real-shaped cells; MIN_SIZE {args.min_size} / MAX_SIZE {args.max_size}"
              + (f"; ours at SCALE {args.scale:g}" if args.scale else "") + "; batch 1")
        results = {}
        for kind in ("ours", "stock"):
            if args.only and kind != args.only:
                continue
            r = in_fresh_process(run_one, kind, args, tmp)
            name = f"{kind} ({args.backbone if kind == 'ours' else args.stock_backbone})"
            if r is None:
                print(f"{name:>32}: failed (the error is above; killed without one = out of memory)")
                continue
            results[kind] = r
            print(f"{name:>32}: image to the model {r['input'][0]}x{r['input'][1]}, {r['instances']} instances, "
                  f"masks {r['mask_mb']:.0f} MB, data {r['data_s']:.2f} s, step {r['step_s']:.2f} s "
                  f"({1 / r['step_s']:.3f} steps/s), peak host +{r['host_mb']:.0f} MB"
                  + (f", peak GPU {r['gpu_mb'] / 1024:.2f} GB" if args.device.startswith("cuda") else ""))
        if len(results) == 2:
            o, s = results["ours"], results["stock"]
            print(f"ours/stock: step time {o['step_s'] / s['step_s']:.2f}, peak host {o['host_mb'] / s['host_mb']:.2f}, "
                  f"mask bytes {o['mask_mb'] / s['mask_mb']:.2f}"
                  + (f", peak GPU {o['gpu_mb'] / s['gpu_mb']:.2f}" if args.device.startswith("cuda") else ""))


if __name__ == "__main__":
    main()
