"""Post-processing + RLE encoding at 1000 detections: ours (paste into the box region, encode from
there) vs torchvision's stock path (paste every mask into a full-size canvas) + naive encoding of
the full masks, on image sizes from the real test-id table, same inputs, one run.

    python -m bench.postprocess                 # CPU
    python -m bench.postprocess --device cuda   # masks and boxes start on the GPU, as the model leaves them

Each measurement runs in a fresh process; peak memory is that process's peak resident memory
above its level just before the measurement (host memory; on CUDA also the allocator's peak).
Where the stock path would need more memory than --stock-limit-gb it runs on a slice of the
detections and its time and memory are scaled up linearly (they are linear in N); the line says so.
"""
import argparse
import json
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

import predict
from bench.hw3real import TABLE
from bench.procmem import in_fresh_process, rss_mb, start_peaks


def make_output(n, h, w, device, seed=0):
    """n cell-sized detections (6-60 px boxes, some at the border), random 28x28 probabilities."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(6, 60, (n, 2))
    x0, y0 = rng.uniform(-10, w, n), rng.uniform(-10, h, n)
    boxes = np.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    g = torch.Generator().manual_seed(seed)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
            "scores": torch.rand(n, generator=g).to(device), "labels": torch.randint(1, 5, (n,), generator=g).to(device),
            "mask_probs": torch.rand(n, 1, 28, 28, generator=g).to(device)}


def run_one(kind, n, h, w, device, queue):
    torch.set_num_threads(torch.get_num_threads())
    out = make_output(n, h, w, device)
    base = start_peaks(device.startswith("cuda"))
    t0 = time.perf_counter()
    if kind == "ours":
        results = predict.image_records(out, 1, 0.5, (h, w))
        count = len(results)
    else:
        masks = paste_masks_in_image(out["mask_probs"], out["boxes"], (h, w))[:, 0] > 0.5
        masks = masks.cpu().numpy()
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]  # naive: one by one
        count = len(rles)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    queue.put((seconds, rss_mb("VmHWM") - base, gpu_mb, count))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detections", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stock-limit-gb", type=float, default=4.0)
    args = ap.parse_args()
    table = json.loads(TABLE.read_text())
    areas = sorted(table, key=lambda r: r["height"] * r["width"])
    picks = {"smallest": areas[0], "median": areas[len(areas) // 2], "largest": areas[-1]}
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads")
    print(f"device: {device_name}; {args.detections} detections per image; torch {torch.__version__}")
    ratios = []
    for label, rec in picks.items():
        h, w = rec["height"], rec["width"]
        ours = in_fresh_process(run_one, "ours", args.detections, h, w, args.device)
        stock_bytes = args.detections * h * w * 5  # float canvas + bool copy
        n_stock = args.detections
        if stock_bytes > args.stock_limit_gb * 2**30:
            n_stock = max(1, int(args.detections * args.stock_limit_gb * 2**30 / stock_bytes))
        stock = in_fresh_process(run_one, "stock", n_stock, h, w, args.device)
        scale = args.detections / n_stock
        s_time, s_mem, s_gpu = stock[0] * scale, stock[1] * scale, stock[2] * scale
        note = f" (stock measured on {n_stock} detections, scaled x{scale:.1f})" if n_stock < args.detections else ""
        print(f"{label:>8} {h}x{w}: ours {ours[0]:.3f} s, +{ours[1]:.0f} MB host"
              + (f", {ours[2]:.0f} MB GPU" if args.device.startswith("cuda") else "")
              + f" | stock {s_time:.3f} s, +{s_mem:.0f} MB host"
              + (f", {s_gpu:.0f} MB GPU" if args.device.startswith("cuda") else "")
              + f" | speed-up x{s_time / ours[0]:.1f}{note}")
        ratios.append(s_time / ours[0])
    print(f"stock/ours time ratio (median image .. largest): {ratios[1]:.1f} .. {ratios[2]:.1f}")


if __name__ == "__main__":
    main()
