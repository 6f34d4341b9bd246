"""RPN proposal recall on the densest images: how many proposals the RPN must keep at test time (infer.py
RPN_PROPOSALS; torchvision keeps 1000) for a trained checkpoint's proposals to reach its cells.

    python -m bench.proposal_recall --checkpoint runs/x/best.pt --data-dir data/realistic
    python -m bench.proposal_recall --checkpoint runs/x/best.pt --data-dir data/realistic --budgets 500,1000,2000,4000

For each of the --images densest test images (DATA_DIR/test_gt_coco.json, as bench/realistic_data.py writes
it): the image at the checkpoint's input size (its sizing rule or infer.py INPUT_SCALE, cut into the same tiles
as predict.py where the input would pass MAX_SIZE), the backbone once, then the RPN at each budget (the best N
of each FPN level before its NMS, the best N after, per input); recall = the share of the image's cells with a
proposal of IoU >= 0.5 (proposals of all tiles together). Prints a line per image and budget, then the totals and
the device.
"""
import argparse
import time

import torch
from torchvision.ops import box_iou

import evaluate
import infer
from dataset import TestDataset, resize_image
from predict import load_model, predict_options, tile_grid, tiling
from utils import pick_device


def inputs(image, opts):
    """[(model input, (x0, y0) offset in the image, factor)] as predict.py cuts an image (predict.tiling)."""
    factor, tile = tiling(image, opts)
    if not tile:
        return [(resize_image(image, factor), (0, 0), factor)]
    ys, xs = tile_grid(image.shape[-2:], tile, opts["tile_overlap"])
    return [(resize_image(image[:, y0:y0 + tile, x0:x0 + tile], factor), (x0, y0), factor) for y0 in ys for x0 in xs]


@torch.no_grad()
def proposals_at(model, image, opts, budgets, device):
    """{budget: proposals (N, 4) in image pixels} of one image."""
    found = {b: [] for b in budgets}
    for x, (x0, y0), factor in inputs(image, opts):
        images, _ = model.transform([x.to(device)])
        features = model.backbone(images.tensors)
        for b in budgets:
            model.rpn._pre_nms_top_n["testing"] = model.rpn._post_nms_top_n["testing"] = b
            boxes = model.rpn(images, features)[0][0].float().cpu() / factor
            found[b].append(boxes + torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype))
    return {b: torch.cat(v) for b, v in found.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", required=True, help="a dataset with test_gt_coco.json")
    ap.add_argument("--images", type=int, default=5, help="the densest N test images")
    ap.add_argument("--budgets", default="500,1000,2000,4000", help="RPN proposals to try")
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    budgets = [int(b) for b in args.budgets.split(",")]
    settings = infer.prediction_settings()
    model, ckpt = load_model(args.checkpoint, device, settings)
    cfg = ckpt["config"]
    opts = predict_options(cfg, settings)
    sizing = opts["sizing"]
    gt = evaluate.test_ground_truth(args.data_dir)
    dataset = TestDataset(args.data_dir)
    cells = {rec["id"]: len(gt.getAnnIds(imgIds=[rec["id"]])) for rec in dataset.table}
    densest = [i for i in sorted(range(len(dataset)), key=lambda i: -cells[dataset.table[i]["id"]])[:args.images]
               if cells[dataset.table[i]["id"]]]  # an image without cells has no recall
    hit, total, t0 = {b: 0 for b in budgets}, 0, time.time()
    print(f"{args.checkpoint}: backbone {cfg['BACKBONE']}, sizing MIN_SIZE {sizing[0]} / MAX_SIZE {sizing[1]} / "
          f"SCALE {sizing[2]:g}; recall at IoU {args.iou} of the {len(densest)} densest test images")
    for i in densest:
        image, rec = dataset[i]
        boxes = torch.tensor([a["bbox"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[rec["id"]]))], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        found = proposals_at(model, image, opts, budgets, device)
        line = []
        for b in budgets:
            reached = int((box_iou(boxes, found[b]).max(1).values >= args.iou).sum()) if len(found[b]) else 0
            hit[b] += reached
            line.append(f"{b}: {reached / len(boxes):.3f}")
        total += len(boxes)
        print(f"  {rec['file_name']} ({image.shape[-1]}x{image.shape[-2]} px, {len(boxes)} cells): " + "  ".join(line))
    print("all: " + "  ".join(f"{b}: {hit[b] / max(total, 1):.3f}" for b in budgets)
          + f"  ({total} cells; {time.time() - t0:.0f} s on {device})")
    return {b: hit[b] / max(total, 1) for b in budgets}


if __name__ == "__main__":
    main()
