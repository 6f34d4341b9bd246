"""Tiled inference: boxes first, masks last (predict.predict_tiled) against the one-pass way (the model's own
forward on every tile, masks for each tile's DETECTIONS_PER_IMAGE, then the core filter and the budget).

    python -m bench.tiled_inference --checkpoint runs/x/best.pt --data-dir data/realistic
    python -m bench.tiled_inference --checkpoint runs/x/best.pt --data-dir data/realistic --images 3 --input-scale 1
    python -m bench.tiled_inference --checkpoint runs/x/best.pt --data-dir data/realistic --image-ids 3,14

For each of the --images densest test images that the checkpoint's sizing rule tiles, or each of --image-ids
(DATA_DIR/test_gt_coco.json, as bench/realistic_data.py writes it): seconds of each way, the boxes the mask head ran on, and whether the two
give the same detections and masks. infer.py's prediction constants (DETECTIONS_PER_IMAGE, RPN_PROPOSALS, ...)
as they stand. Prints the device and, last, the ratio of the one-pass time to ours.
"""
import argparse
import time

import torch

import evaluate
import infer
import predict
from dataset import TestDataset
from heads import class_budget
from utils import pick_device


def one_pass_tiled(model, image, factor, tile, tile_overlap, nms_threshold, detections_per_image, class_reserve):
    """predict_tiled's detections the one-pass way: every tile through the model's forward (masks for all its
    detections), then the same core filter (predict.tile_owns), NMS and budget."""
    ys, xs = predict.tile_grid(image.shape[-2:], tile, tile_overlap)
    margin = predict.core_margin(tile, tile_overlap)
    parts = []
    for y0, ycore in zip(ys, predict.tile_cores(ys, tile)):
        for x0, xcore in zip(xs, predict.tile_cores(xs, tile)):
            out = predict.forward_resized(model, image[:, y0:y0 + tile, x0:x0 + tile], factor)
            out["boxes"] += torch.tensor([x0, y0, x0, y0], dtype=out["boxes"].dtype)
            parts.append(predict.subset_detections(out, predict.tile_owns(out["boxes"], ycore, xcore, margin)))
    out = predict.cat_detections(parts)
    keep = predict.batched_nms(out["boxes"], out["scores"], out["labels"], nms_threshold)
    keep = keep[class_budget(out["scores"][keep], out["labels"][keep], detections_per_image, class_reserve)]
    return predict.subset_detections(out, keep)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", required=True, help="a dataset with test_gt_coco.json")
    ap.add_argument("--images", type=int, default=2, help="the densest N test images that are tiled")
    ap.add_argument("--image-ids", default="", help="these test image ids (comma-separated) instead of --images")
    ap.add_argument("--input-scale", type=float, default=0.0, help="infer.py INPUT_SCALE (0: as trained)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    settings = infer.prediction_settings(INPUT_SCALE=args.input_scale)
    model, ckpt = predict.load_model(args.checkpoint, device, settings)
    opts = predict.predict_options(ckpt["config"], settings)
    coco_gt = evaluate.test_ground_truth(args.data_dir)
    dataset = TestDataset(args.data_dir)
    cells = {i: len(coco_gt.getAnnIds(imgIds=[i])) for i in coco_gt.getImgIds()}
    items = [dataset[k] for k in range(len(dataset))]
    items = sorted([(img, meta) for img, meta in items if predict.tiling(img, opts)[1]],
                   key=lambda x: -cells[x[1]["id"]])
    if args.image_ids:  # every id asked for, whatever --images says
        wanted = [s.strip() for s in args.image_ids.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {str(i) for i in cells})
        untiled = sorted(set(wanted) - set(unknown) - {str(meta["id"]) for _, meta in items})
        if unknown or untiled:
            raise SystemExit(f"--image-ids: {', '.join(unknown) or '-'} not test image ids of {args.data_dir}; "
                             f"{', '.join(untiled) or '-'} not tiled by this sizing rule")
        items = [x for x in items if str(x[1]["id"]) in wanted]
    else:
        items = items[:args.images]
    masked = []  # RoIs through the mask head
    model.roi_heads.mask_head.register_forward_hook(lambda module, inputs, output: masked.append(len(output)))
    total_ours = total_one = 0.0
    for n, (image, meta) in enumerate(items):
        image = image.to(device)
        factor, tile = predict.tiling(image, opts)
        ys, xs = predict.tile_grid(image.shape[-2:], tile, opts["tile_overlap"])
        tiles = len(ys) * len(xs)
        ways = {"ours": lambda: predict.predict_image(model, image, opts),
                "one": lambda: one_pass_tiled(model, image, factor, tile, tile_overlap=opts["tile_overlap"],
                                              nms_threshold=opts["nms_threshold"],
                                              detections_per_image=opts["detections_per_image"],
                                              class_reserve=opts["class_reserve"])}
        if n == 0:
            ways["one"]()  # warm-up, untimed
        got = {}
        for way in (["ours", "one"] if n % 2 else ["one", "ours"]):  # each way first on every other image
            masked.clear()
            out, seconds = timed(ways[way], device)
            got[way] = (out, seconds, sum(masked))
        (ours, t_ours, n_ours), (one, t_one, n_one) = got["ours"], got["one"]
        diff = max((ours[k].float() - one[k].float()).abs().max().item() for k in predict.FIELDS) \
            if len(ours["boxes"]) == len(one["boxes"]) and len(ours["boxes"]) else float("nan")
        print(f"image {meta['id']} ({image.shape[-2]}x{image.shape[-1]} px, {cells[meta['id']]} cells, {tiles} tiles): "
              f"boxes first {t_ours:.1f} s (mask head on {n_ours} boxes), one pass {t_one:.1f} s (on {n_one}); "
              f"{len(ours['boxes'])} / {len(one['boxes'])} detections, largest difference {diff:.2g}", flush=True)
        total_ours += t_ours
        total_one += t_one
    print(f"device {device} ({torch.get_num_threads()} threads), DETECTIONS_PER_IMAGE {opts['detections_per_image']}, "
          f"RPN_PROPOSALS {settings['RPN_PROPOSALS']}")
    print(f"one pass / boxes first: {total_one / max(total_ours, 1e-9):.2f}x ({total_one:.1f} s / {total_ours:.1f} s)")


if __name__ == "__main__":
    main()
