"""The peer: the model a user would pick instead of ours. torchvision's stock maskrcnn_resnet50_fpn recipe,
trained and scored on the same data, split and budget as a train.py run (bench/ablate.py --peer adds its row).

    python -m bench.peer --data-dir data/realistic --run-dir runs/peer --backbone resnet18 --epochs 3 \\
        --min-size 512 --max-size 683 [--minutes 6] [--weights-backbone resnet18.safetensors]

What is stock (torchvision's models and references/detection/train.py, unchanged):
- the model: `maskrcnn_resnet50_fpn` (backbone resnet50; for another ResNet depth, the same builder's
  recipe: torchvision's resnet -> `_resnet_fpn_extractor`, FPN over 4 stages + max-pool level), its default
  anchors ((32,), (64,), (128,), (256,), (512,)) x (0.5, 1, 2), RoIAlign 7/14, stock losses, score 0.05,
  NMS 0.5, 100 detections per image, GeneralizedRCNNTransform (ImageNet mean/std, MIN_SIZE/MAX_SIZE).
  From scratch (no weights): BatchNorm live and all 5 layers trainable, as torchvision does with no
  weights; with a local backbone weights file: FrozenBatchNorm2d and 3 trainable layers, as with its
  ImageNet weights. Nothing is downloaded.
- the training: the references' SGD (momentum 0.9, weight decay 1e-4), lr 0.02 for 16 images a step
  scaled linearly to batch 1 (0.00125, the references' linear-scaling rule), linear warm-up from 0.001x
  over min(1000, steps in epoch 1), MultiStepLR x0.1 at epochs 16 and 22 of 26 (scaled to EPOCHS),
  RandomHorizontalFlip(0.5). Or (schedule cosine) the references' other scheduler, cosine annealing, fit to the
  budget as train.py's SCHEDULE cosine is: from lr to 0 over EPOCHS, or over the minutes where they end sooner.
What a careful user adds, as train.py does for ours: val AP50 after every epoch and best.pt, the weights of
the best val AP50 so far (the latest where val picks nothing: no val split, or fewer than MIN_VAL_IMAGES),
which bench/ablate.py tunes and scores.
What is shared with ours: the training images (train.py's split, same seed and VAL_FRACTION), the
input size (the images are handed over at the model's input size, as CellDataset does for ours, so
no N x H x W float copy of the masks is made; the stock transform then resizes by 1), batch 1, the
epochs or minutes of training, the held-out test images and their scoring (evaluate.py).

The run folder gets last.pt (every epoch: resumable), best.pt (best val AP50) and metrics.csv (epoch, val_ap50,
train_seconds).
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import misc as misc_nn_ops

import engine
import evaluate
import losses
from dataset import CellDataset, TestDataset, collate, list_train_ids, split_ids
from utils import CHECKPOINT_FORMAT, NUM_CLASSES, encode_mask, load_checkpoint, save_checkpoint, seed_everything, write_csv

STOCK_WEIGHTS = losses.preset_weights("stock")  # torchvision's five terms, each weighted 1: their plain sum
# What bench/ablate.py --peer tries (each with the run's budget), choosing on the validation split: the references'
# SGD at its scaled rate and 4x and 8x it, and AdamW around the rate a from-scratch user would try first.
GRID = [(o, lr, "multistep") for o, lr in (("sgd", 0.00125), ("sgd", 0.005), ("sgd", 0.01), ("adamw", 1e-4),
                                           ("adamw", 2e-4), ("adamw", 4e-4))]
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine")  # the references' MultiStepLR, or cosine annealing over the budget
REFERENCE = dict(lr_per_16_images=0.02, momentum=0.9, weight_decay=1e-4, lr_steps=(16, 22), epochs=26,
                 lr_gamma=0.1, warmup_factor=1e-3, warmup_iters=1000)


def build_peer(backbone="resnet50", min_size=800, max_size=1333, weights_backbone="", pretrained=None):
    """torchvision's maskrcnn_resnet50_fpn recipe with a torchvision ResNet of the given depth. weights_backbone:
    a local weights file loaded into the ResNet; pretrained=True without a file: the same architecture
    (frozen BatchNorm, 3 trainable layers) for a checkpoint to be loaded over."""
    if not hasattr(torchvision.models, backbone) or not backbone.startswith(("resnet", "resnext", "wide_resnet")):
        raise SystemExit(f"peer: no torchvision ResNet called {backbone!r} (ours is {backbone!r}; the peer needs "
                         "a torchvision ResNet of the same family: resnet18/34/50/101)")
    pretrained = bool(weights_backbone) if pretrained is None else pretrained
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = getattr(torchvision.models, backbone)(weights=None, norm_layer=norm_layer)
    if weights_backbone:
        state = _read_weights(weights_backbone)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")]:
            raise SystemExit(f"peer: {weights_backbone} does not fit torchvision's {backbone}: missing {missing[:3]} ...")
    trainable = 3 if pretrained else 5  # torchvision's choice with / without pretrained weights
    model = MaskRCNN(_resnet_fpn_extractor(net, trainable), num_classes=NUM_CLASSES + 1,
                     min_size=min_size, max_size=max_size)  # every other setting: torchvision's default
    return model


def _read_weights(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def predict_records(model, dataset, device, image_id_of):
    """Stock inference (the model resizes and pastes full-size masks), masks > 0.5 -> submission records."""
    model.eval()
    records = []
    with torch.no_grad():
        for i in range(len(dataset)):
            image, meta = dataset[i]
            out = model([image.to(device)])[0]
            for box, score, label, mask in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(),
                                               out["masks"][:, 0].cpu()):
                records.append({"image_id": int(image_id_of(i, meta)), "bbox": [box[0], box[1], box[2] - box[0],
                                                                                 box[3] - box[1]],
                                "score": float(score), "category_id": int(label),
                                "segmentation": encode_mask((mask > 0.5).numpy())})
    return records


def make_optimizer(params, optimizer, lr):
    """The peer's optimiser: the references' SGD (momentum 0.9, weight decay 1e-4), or AdamW with the same
    weight decay (what a user would reach for at batch 1). lr 0: the references' 0.02 per 16 images, scaled."""
    lr = lr or REFERENCE["lr_per_16_images"] / 16
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=REFERENCE["momentum"], weight_decay=REFERENCE["weight_decay"])
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=REFERENCE["weight_decay"])
    raise ValueError(f"peer optimizer {optimizer!r}: sgd or adamw")


def flip(image, target):
    """The references' RandomHorizontalFlip(0.5): the image, its boxes and masks mirrored, half the time."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
        w = image.shape[-1]
        target["boxes"] = torch.stack([w - target["boxes"][:, 2], target["boxes"][:, 1],
                                       w - target["boxes"][:, 0], target["boxes"][:, 3]], 1)
        target["masks"] = target["masks"].flip(-1)
    return image, target


def train_epoch(model, loader, optimizer, state, lr, warmup, deadline, device, cosine=None):
    """One epoch of engine.train_step (stopping at the deadline), with the references' linear warm-up over the
    first steps of epoch 0; cosine ({"EPOCHS", "MAX_MINUTES"}: the budget) sets the LR at every step as
    train.py's SCHEDULE cosine does. Returns (summed loss, steps)."""
    total, steps = 0.0, 0
    for images, targets in loader:
        if time.time() >= deadline:
            break
        if cosine is not None:
            engine.set_lr(optimizer, state["step"], warmup,
                          engine.budget_used(cosine, state["step"], len(loader), deadline, device))
        elif state["epoch"] == 0 and state["step"] < warmup:
            alpha = state["step"] / warmup
            for g in optimizer.param_groups:
                g["lr"] = lr * (REFERENCE["warmup_factor"] * (1 - alpha) + alpha)
        image, target = flip(images[0], {k: v.to(device) for k, v in targets[0].items() if torch.is_tensor(v)})
        state["step"] += 1
        loss, loss_dict = engine.train_step(model, [image.to(device)], [target], optimizer, STOCK_WEIGHTS)
        if loss is None:
            raise FloatingPointError(f"peer: non-finite loss {({k: v.item() for k, v in loss_dict.items()})}")
        total, steps = total + loss.item(), steps + 1
    return total, steps


def train_peer(data_dir, run_dir, backbone="resnet50", epochs=26, minutes=0.0, min_size=800, max_size=1333,
               val_fraction=0.1, seed=42, weights_backbone="", device="cpu", log=print, optimizer="sgd", lr=0.0,
               split_seed=None, min_val_images=1, schedule="multistep"):
    """Train the peer (resuming run_dir/last.pt if there); returns the path of best.pt: the weights of the best val
    AP50 so far, or the latest where val picks nothing (fewer than min_val_images val images, as train.py's
    MIN_VAL_IMAGES, or no val AP50). seed: initialisation and data order; split_seed (None: seed): the train/val
    split, as train.py's SPLIT_SEED. schedule: one of SCHEDULES."""
    if schedule not in SCHEDULES:
        raise ValueError(f"peer schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    seed_everything(seed)
    train_ids, val_ids = split_ids(list_train_ids(data_dir), val_fraction, seed if split_seed is None else split_seed)
    train_set = CellDataset(data_dir, train_ids, train=False, sizing=(min_size, max_size, 0.0))
    val_set = CellDataset(data_dir, val_ids, train=False)
    model = build_peer(backbone, min_size, max_size, weights_backbone).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    kind, optimizer = optimizer, make_optimizer(params, optimizer, lr)
    lr = optimizer.param_groups[0]["lr"]
    milestones = [max(1, round(m * epochs / REFERENCE["epochs"])) for m in REFERENCE["lr_steps"]]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=REFERENCE["lr_gamma"])
    state = {"epoch": 0, "step": 0, "train_seconds": 0.0, "history": [], "best_ap50": -math.inf}
    generator = torch.Generator().manual_seed(seed)
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    if last.exists():
        ckpt = load_checkpoint(last)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"])
        generator.set_state(ckpt["loader_rng"])
    coco_gt = evaluate.val_ground_truth(val_set) if len(val_set) else None
    select = coco_gt is not None and len(val_set) >= min_val_images  # does val AP50 pick best.pt?
    loader = torch.utils.data.DataLoader(train_set, batch_size=1, shuffle=True, collate_fn=collate,
                                         generator=generator)
    budget = minutes * 60
    warmup = min(REFERENCE["warmup_iters"], len(loader) - 1)
    cosine = {"EPOCHS": epochs, "MAX_MINUTES": minutes} if schedule == "cosine" else None
    log(f"peer {run_dir}: torchvision MaskRCNN, {backbone} FPN ({'local weights' if weights_backbone else 'from scratch'}),"
        f" {len(train_ids)} train / {len(val_ids)} val images, {kind} lr {lr:g} ({schedule}), MIN_SIZE {min_size} / MAX_SIZE {max_size}, "
        f"{epochs} epochs" + (f" or {minutes:g} min" if minutes else ""))
    while state["epoch"] < epochs and not (budget > 0 and state["train_seconds"] >= budget):
        model.train()
        t0 = time.time()
        deadline = t0 + budget - state["train_seconds"] if budget > 0 else math.inf
        total, steps = train_epoch(model, loader, optimizer, state, lr, warmup, deadline, device, cosine)
        if cosine is None:
            if state["epoch"] == 0 and state["step"] >= warmup:
                for g in optimizer.param_groups:
                    g["lr"] = lr
            scheduler.step()
        state["epoch"] += 1
        state["train_seconds"] += time.time() - t0
        ap50 = float("nan")
        if coco_gt is not None:
            records = predict_records(model, val_set, device, lambda i, _: i)
            ap50 = evaluate.coco_evaluate(coco_gt, records, max_dets=100)["ap50"]
        state["history"].append({"epoch": state["epoch"], "lr": optimizer.param_groups[0]["lr"],
                                 "train_loss": total / max(steps, 1), "val_ap50": ap50,
                                 "train_seconds": state["train_seconds"]})
        improved, best_ap50 = engine.best_so_far(ap50, state["best_ap50"])  # train.py's rule for best.pt
        if select:
            state["best_ap50"] = best_ap50
        improved = improved or not select  # val picks nothing: the latest weights
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "state": state, "rng": torch.get_rng_state(),
                "loader_rng": generator.get_state(), "epoch": state["epoch"], "format": CHECKPOINT_FORMAT,
                "config": dict(BACKBONE=backbone, MIN_SIZE=min_size, MAX_SIZE=max_size, PEER=True,
                               WEIGHTS_BACKBONE=weights_backbone, OPTIMIZER=kind, LR=lr, SCHEDULE=schedule,
                               SEED=seed)}
        if improved:  # best.pt first: a crash between the two writes reruns this epoch on resume
            save_checkpoint(ckpt, best)
        save_checkpoint(ckpt, last)
        write_csv(run_dir / "metrics.csv", state["history"], ["epoch", "lr", "train_loss", "val_ap50", "train_seconds"])
        log(f"peer epoch {state['epoch']}: train loss {total / max(steps, 1):.4f}  val AP50 {ap50:.4f}  "
            f"{state['train_seconds']:.0f}s of training" + ("  (best)" if improved else ""))
    if not best.exists():
        raise SystemExit(f"peer: {run_dir} holds a run finished before the peer kept best.pt; use another run folder"
                         if last.exists() else f"peer: {run_dir}: no epoch trained (epochs {epochs}), so no best.pt")
    return best


def load_peer(checkpoint, device="cpu"):
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    model = build_peer(cfg["BACKBONE"], cfg["MIN_SIZE"], cfg["MAX_SIZE"], pretrained=bool(cfg.get("WEIGHTS_BACKBONE")))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def test_records(checkpoint, data_dir, device="cpu"):
    """The peer's submission records of DATA_DIR/test_release (ids from the id table)."""
    model, _ = load_peer(checkpoint, device)
    dataset = TestDataset(data_dir)
    return predict_records(model, dataset, torch.device(device), lambda i, rec: rec["id"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--epochs", type=int, default=REFERENCE["epochs"])
    ap.add_argument("--minutes", type=float, default=0.0)
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--lr", type=float, default=0.0, help="0: the references' SGD rate, 0.02 / 16")
    ap.add_argument("--schedule", default="multistep", choices=SCHEDULES,
                    help="multistep: the references' x0.1 at epochs 16 and 22 of 26 (scaled to --epochs); cosine: "
                         "from lr to 0 over --epochs, or --minutes where they end sooner")
    ap.add_argument("--weights-backbone", default="", help="local torchvision/timm ResNet weights file")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    best = train_peer(args.data_dir, args.run_dir, args.backbone, args.epochs, args.minutes, args.min_size,
                      args.max_size, args.val_fraction, args.seed, args.weights_backbone, args.device,
                      optimizer=args.optimizer, lr=args.lr, schedule=args.schedule)
    gt_path = Path(args.data_dir) / "test_gt_coco.json"
    if gt_path.is_file():
        metrics = evaluate.coco_evaluate(evaluate.test_ground_truth(args.data_dir),
                                         test_records(best, args.data_dir, args.device))
        print(f"peer test AP50 (maxDets 100) {metrics['ap50']:.4f}  AP@[.5:.95] {metrics['ap']:.4f}")


if __name__ == "__main__":
    main()
