"""Training-step time of each loss preset against `stock`, same model weights and inputs, one run.

    python bench/losses.py                       # CPU: resnet18 backbone, the real course sample
    python bench/losses.py --backbone seresnextaa101d_32x8d.sw_in12k_ft_in1k_288 --device cuda

Prints the device, per-preset mean step time (forward + backward + AdamW step), the cost of the
boundary loss's distance maps alone, and last the `report`/`stock` ratio.
"""
import argparse
import warnings
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402
from dataset import CellDataset  # noqa: E402
from model import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hw3real import SAMPLE  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # random-init FREEZE_BN note: timing only
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; backbone {args.backbone}; MIN_SIZE {args.min_size}; torch {torch.__version__}")

    image, target = _sample()
    image = image.to(device)
    target = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in target.items()}
    print(f"input: real course sample {tuple(image.shape[1:])}, {len(target['labels'])} instances")

    cfg = dict(BACKBONE=args.backbone, PRETRAINED=False, FREEZE_BN=True, MIN_SIZE=args.min_size,
               MAX_SIZE=args.max_size, LOSSES="stock")
    torch.manual_seed(0)
    base = build_model(cfg)
    presets = ["stock", "ciou_dice_boundary", "report"]
    models = {p: losses.configure_losses(copy.deepcopy(base), p).to(device).train() for p in presets}
    optims = {p: torch.optim.AdamW(models[p].parameters(), lr=1e-5) for p in presets}
    times = {p: [] for p in presets}
    for i in range(args.warmup + args.steps):  # presets interleaved step by step: drift hits all alike
        for p in presets:
            torch.manual_seed(i)  # the same RoI sampling for every preset
            sync(device)
            t0 = time.perf_counter()
            loss = losses.weighted_total(models[p]([image], [target]), losses.preset_weights(p))
            optims[p].zero_grad()
            loss.backward()
            optims[p].step()
            sync(device)
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


def _sample():
    import shutil
    import tempfile
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(SAMPLE, tmp / "train" / "course-sample")
    return CellDataset(tmp, ["course-sample"], sizing=(800, 1333, 0.0))[0]  # the recipe's input size


if __name__ == "__main__":
    main()
