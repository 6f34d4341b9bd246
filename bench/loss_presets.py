"""Training-step time of each loss preset against `stock`, same model weights and inputs, one run.

    python -m bench.loss_presets                       # CPU: resnet18 backbone, the real course sample
    python -m bench.loss_presets --backbone seresnextaa101d_32x8d.sw_in12k_ft_in1k_288 --device cuda

Each preset gets its own model (the preset is an argument of the RoI heads), built from the same seed, so
all start from the same weights. The step is engine.train_step, the one train.py runs (forward, backward,
GRAD_CLIP, AdamW; --amp as train.py's AMP, default auto: none on the CPU). Prints the device, per-preset
median step time, the cost of the boundary loss's distance maps alone, and last the `report`/`stock` ratio.
"""
import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import engine
import losses
import train
from bench.hw3real import SAMPLE
from bench.procmem import sync
from dataset import CellDataset
from model import build_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default=train.AMP, help="auto | fp16 | bf16 | off: train.py's AMP (auto: none on the CPU)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # random-init FREEZE_BN note: timing only
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    dtype, amp = engine.amp_dtype(args.amp, device)
    print(f"device: {name}; backbone {args.backbone}; MIN_SIZE {args.min_size}; AMP {amp}; torch {torch.__version__}")

    image, target = _sample(args.min_size, args.max_size)
    image = image.to(device)
    target = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in target.items()}
    print(f"input: real course sample {tuple(image.shape[1:])}, {len(target['labels'])} instances")

    cfg = {key: getattr(train, key) for key, _, _ in train.CONFIG}  # train.py's constants, then:
    cfg.update(BACKBONE=args.backbone, PRETRAINED=False, PRETRAINED_WEIGHTS="", FREEZE_BN=True,  # the recipe's
               ROI_BATCH_SIZE=train.AUTO_ROI_BATCH_SIZE["pretrained"], MIN_SIZE=args.min_size, MAX_SIZE=args.max_size)
    presets = ["stock", "ciou_dice_boundary", "report"]
    models = {}
    for p in presets:
        torch.manual_seed(0)  # the same weights for every preset
        models[p] = build_model({**cfg, "LOSSES": p}, load_pretrained=False).to(device).train()
    first = models[presets[0]].state_dict()
    assert all(torch.equal(v, models[p].state_dict()[k]) for p in presets[1:] for k, v in first.items()), \
        "the presets' models do not start from the same weights"
    optims = {p: torch.optim.AdamW(models[p].parameters(), lr=1e-5) for p in presets}
    weights = {p: losses.preset_weights(p) for p in presets}
    scalers = {p: torch.amp.GradScaler(device.type, enabled=dtype == torch.float16) for p in presets}
    times = {p: [] for p in presets}
    for i in range(args.warmup + args.steps):  # presets interleaved step by step: drift hits all alike
        for p in presets:
            torch.manual_seed(i)  # the same RoI sampling for every preset
            sync(device)
            t0 = time.perf_counter()
            loss, _ = engine.train_step(models[p], [image], [target], optims[p], weights[p], scaler=scalers[p],
                                        dtype=dtype, grad_clip=cfg["GRAD_CLIP"], step=i + 1)
            sync(device)
            if loss is None:
                raise FloatingPointError(f"{p}: non-finite loss at step {i}")
            if i >= args.warmup:
                times[p].append(time.perf_counter() - t0)
    results = {p: statistics.median(t) for p, t in times.items()}
    for p in presets:
        print(f"{p:>20}: {results[p] * 1000:8.1f} ms/step (median of {args.steps}, min {min(times[p]) * 1000:.1f})")

    masks = (torch.rand(128, 28, 28, device=device) > 0.5).float()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        losses.signed_distance(masks)
    sync(device)
    print(f"distance maps for 128 RoIs (28x28): {(time.perf_counter() - t0) / 10 * 1000:.2f} ms")
    for preset in ["ciou_dice_boundary", "report"]:
        print(f"{preset}/stock step-time ratio: {results[preset] / results['stock']:.3f}")


def _sample(min_size, max_size):
    """The course sample at the model's input size (the model does not resize: CellDataset does)."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(SAMPLE, Path(tmp) / "train" / "course-sample")
        return CellDataset(tmp, ["course-sample"], sizing=(min_size, max_size, 0.0))[0]


if __name__ == "__main__":
    main()
