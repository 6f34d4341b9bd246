"""Training cost of each lever per step: the recipe, then HEADS cascade, EMA, SCALE_JITTER, STAIN_AUG and the
COCO-start architecture, each alone, on the same realistic images (the real HW3 geometry, painted), with
torchvision's stock Mask R-CNN (bench/peer.py) measured last in the same run.

    python -m bench.levers                                  # CPU: resnet18, 384/512 px (as the README's ablation)
    python -m bench.levers --device cuda --amp fp16 --backbone seresnextaa101d_32x8d.sw_in12k_ft_in1k_288 \\
        --min-size 800 --max-size 1333 --stock-backbone resnet50      # the recipe's sizes on a GPU

Ours samples the pretrained recipe's 512 RoIs an image; `--roi-batch-size auto` times a run from scratch (128).

Each configuration trains `--steps` steps (after `--warmup` untimed ones) over the same images in the same
order with the same seed: data seconds (reading, augmentation, resizing, masks) and step seconds per step,
their sum, and the ratio of that sum to the recipe's. The step is engine.train_step, the one train.py runs:
forward, backward, GRAD_CLIP, AdamW, the EMA update (ours); the peer's row is bench/peer.py's step (its SGD, no
clipping, no EMA) on the images at its input size, as bench/peer.py hands them over. The COCO row is torchvision's
Mask R-CNN v2 architecture (ResNet-50, 4-conv heads) with random weights (its cost does not depend on them):
compare it with the `recipe, resnet50` row, which `--with-resnet50` adds.
"""
import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

import engine
import losses
import train
from bench import peer
from bench.procmem import sync
from bench.realistic_data import make_realistic_data
from dataset import CellDataset
from model import build_model
from utils import seed_everything

LEVERS = [  # (row, train.py constants over the recipe)
    ("recipe", {}),
    ("HEADS cascade", {"HEADS": "cascade"}),
    ("EMA 0.999", {"EMA": 0.999}),
    ("SCALE_JITTER [0.5, 2]", {"SCALE_JITTER": [0.5, 2.0]}),
    ("STAIN_AUG 0.5", {"STAIN_AUG": 0.5}),
    ("COCO start (R50-FPN v2)", {"BACKBONE": "torchvision/maskrcnn_resnet50_fpn_v2", "FPN_CHANNELS": 256}),
]


def measure(cfg, data_dir, ids, args, device, stock=False):
    """(data s, step s) per step of one configuration (stock: the peer), means over args.steps timed steps."""
    seed_everything(0)
    sizing = (cfg["MIN_SIZE"], cfg["MAX_SIZE"], 0.0)
    if stock:  # as peer.train_peer: images handed over at the input size (its 0.5 flip, a few ms, left out)
        model = peer.build_peer(args.stock_backbone, cfg["MIN_SIZE"], cfg["MAX_SIZE"])
        data = CellDataset(data_dir, ids, train=False, sizing=sizing)
        optimizer = peer.make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", 0.0)
        weights, grad_clip, decay = peer.STOCK_WEIGHTS, 0.0, 0.0
    else:
        model = build_model(cfg, load_pretrained=False)
        data = CellDataset(data_dir, ids, train=True, sizing=sizing, jitter=cfg["SCALE_JITTER"], stain=cfg["STAIN_AUG"],
                           stain_strength=cfg["STAIN_STRENGTH"], to_gray=cfg["TO_GRAY"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                      weight_decay=cfg["WEIGHT_DECAY"])
        weights = losses.preset_weights(cfg["LOSSES"], cfg["LOSS_WEIGHTS"])
        grad_clip, decay = cfg["GRAD_CLIP"], cfg["EMA"]
    model.to(device).train()
    ema = engine.WeightAverage(model, decay)  # the average lives where the model does
    dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    data_s, step_s = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        image, target = data[step % len(data)]
        images, targets = engine.to_device([image], [target], device)
        sync(device)
        t1 = time.perf_counter()
        loss, _ = engine.train_step(model, images, targets, optimizer, weights, scaler=scaler, dtype=dtype,
                                    grad_clip=grad_clip, ema=ema, step=step + 1)
        sync(device)
        if loss is None:
            raise FloatingPointError(f"step {step}: non-finite loss")
        if step >= args.warmup:
            data_s.append(t1 - t0)
            step_s.append(time.perf_counter() - t1)
    return sum(data_s) / len(data_s), sum(step_s) / len(step_s)


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"])
    ap.add_argument("--backbone", default="resnet18", help="ours: a timm model name (random weights: cost only)")
    ap.add_argument("--stock-backbone", default="resnet18", help="the peer's torchvision ResNet")
    ap.add_argument("--losses", default="stock", help="the recipe's LOSSES preset")
    ap.add_argument("--min-size", type=int, default=384)
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--roi-batch-size", default=str(train.AUTO_ROI_BATCH_SIZE["pretrained"]),
                    help="RoIs an image: the pretrained recipe's 512 (default), auto as a run from scratch (128)")
    ap.add_argument("--images", type=int, default=4, help="how many realistic images the steps cycle over")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--with-resnet50", action="store_true", help="also the recipe on a resnet50 (the COCO row's depth)")
    args = ap.parse_args()
    device = torch.device(args.device)
    base = {name: getattr(train, name) for name, _, _ in train.CONFIG}  # train.py's constants: the recipe
    base.update(BACKBONE=args.backbone, PRETRAINED=False, PRETRAINED_WEIGHTS="", FREEZE_BN=False, LOSSES=args.losses,
                MIN_SIZE=args.min_size, MAX_SIZE=args.max_size, ROI_BATCH_SIZE=args.roi_batch_size)
    train.resolve_training_defaults(base)  # 'auto' as a run from scratch resolves it
    levers = LEVERS + ([("recipe, resnet50", {"BACKBONE": "resnet50"})] if args.with_resnet50 else [])
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "d"
        make_realistic_data(data_dir, seed=0, test_fraction=0, images=args.images + 30)
        every = sorted(p.name for p in (data_dir / "train").iterdir())
        sizes = {i: CellDataset(data_dir, [i])[0] for i in every}
        ids = sorted(every, key=lambda i: sizes[i][0].shape[-1] * sizes[i][0].shape[-2])[-args.images:]  # the largest
        cells = [len(sizes[i][1]["labels"]) for i in ids]
        device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"CPU, {torch.get_num_threads()} threads")
        print(f"device: {device_name}; torch {torch.__version__}; AMP {args.amp}; {args.backbone}, LOSSES {args.losses}, "
              f"MIN_SIZE {args.min_size} / MAX_SIZE {args.max_size}; {base['ROI_BATCH_SIZE']} RoIs an image; "
              f"{len(ids)} realistic images ({sum(cells)} cells), {args.steps} timed steps each after {args.warmup}; "
              f"batch 1")
        rows = []
        for name, extra in levers:
            d, s = measure({**base, **extra}, data_dir, ids, args, device)
            rows.append((name, d, s))
            print(f"{name:>26}: data {d:.3f} s + step {s:.3f} s = {d + s:.3f} s per step", flush=True)
        d, s = measure(base, data_dir, ids, args, device, stock=True)
        print(f"{'stock torchvision (peer)':>26}: data {d:.3f} s + step {s:.3f} s = {d + s:.3f} s per step "
              f"({args.stock_backbone})")
        recipe = rows[0][1] + rows[0][2]
        print("per step, relative to the recipe: " + ", ".join(f"{n} {(d + s) / recipe:.2f}" for n, d, s in rows[1:])
              + f"; recipe / stock torchvision {recipe / (d + s):.2f}")


if __name__ == "__main__":
    main()
