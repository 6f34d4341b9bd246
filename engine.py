"""The training engine: the AMP rule, the one training step, an epoch of steps, the weight average (EMA),
and validation (loss, then predict + score). train.py wires these; peer.py and the benchmarks under bench/
call the same train_step, so what they time is what users run (as torchvision's references/detection keep
engine.py apart from train.py).
"""
import math
import time

import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

import ddp
import evaluate
import losses
from predict import predict_dataset, to_records

MAX_SKIPPED_STEPS = 20  # consecutive non-finite losses before a run gives up


def amp_rule(setting, capability):
    """(autocast dtype or None, why) for an AMP setting on a device of CUDA compute `capability`
    ((major, minor); None for the CPU).

    bf16 only where the GPU has it natively (capability >= 8.0: A100, L4, RTX 30xx and newer). A T4
    (7.5) or P100 (6.0) would run bf16 through emulation, slower than fp32 for convolutions (and
    torch.cuda.is_bf16_supported() answers True there, since it counts emulation), so they get fp16
    with a GradScaler. `auto` leaves the CPU in fp32; fp16/bf16 force autocast on the CPU too."""
    setting = str(setting).lower()
    if setting not in ("auto", "fp16", "bf16", "off"):
        raise SystemExit(f"--amp {setting!r}: choose auto, fp16, bf16 or off")
    where = "the CPU" if capability is None else f"a GPU of compute capability {capability[0]}.{capability[1]}"
    native_bf16 = capability is not None and tuple(capability) >= (8, 0)
    if setting == "off":
        return None, "--amp off"
    if setting == "fp16":
        return torch.float16, f"--amp fp16 on {where} (fp16 autocast + GradScaler)"
    if setting == "bf16":
        if capability is not None and not native_bf16:
            raise SystemExit(f"--amp bf16: {where} has no native bf16 (needs capability 8.0 or newer); emulated "
                             "bf16 is slower than fp32 there. Use --amp fp16 (or auto), or --amp off")
        return torch.bfloat16, f"--amp bf16 on {where}"
    if capability is None:
        return None, "auto: full precision on the CPU (--amp fp16 or bf16 forces autocast)"
    if native_bf16:
        return torch.bfloat16, f"auto: bf16, native on {where}"
    return torch.float16, f"auto: fp16 + GradScaler, {where} has no native bf16"


def amp_dtype(setting, device):
    """amp_rule for a torch.device: (autocast dtype or None, why)."""
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return amp_rule(setting, capability)


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


class WeightAverage:
    """An exponential moving average of the weights (timm's ModelEmaV3, warm-up aware: the decay in force at
    step t is min(decay, 1 - (1 + t)^-2/3)), or nothing where decay is 0. Under DDP only rank 0 keeps one
    (it validates and saves; every process holds the same weights): the others pass decay 0.

    update() after each optimiser step; scored(model) is the model validation scores, best.pt keeps and
    infer.py predicts with (the average where there is one); state_dict() is the checkpoint's `ema` entry."""

    def __init__(self, model, decay, state=None):
        self.average = ModelEmaV3(model, decay=decay, use_warmup=True) if decay > 0 else None
        if self.average is not None and state is not None:
            self.average.module.load_state_dict(state)

    def __bool__(self):
        return self.average is not None

    def update(self, model, step):
        if self.average is not None:
            self.average.update(getattr(model, "module", model), step=step)  # the bare model under DDP

    def scored(self, model):
        return self.average.module if self.average is not None else model

    def decay(self, step):
        """The decay in force at a step (None: no average)."""
        return self.average.get_decay(step) if self.average is not None else None

    def state_dict(self):
        return self.average.module.state_dict() if self.average is not None else None


def train_step(model, images, targets, optimizer, weights, scaler=None, dtype=None, grad_clip=0.0, ema=None,
               step=0):
    """One optimiser step: forward under autocast (dtype None: full precision), the weighted loss in fp32,
    backward through the GradScaler (fp16), gradient-norm clipping (grad_clip > 0), the optimiser step and
    the weight average's update. Where the loss is not finite on any process (DDP), no process updates.
    Returns (total loss or None where skipped, {term: loss})."""
    device = images[0].device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss_dict = model(images, targets)
    loss_dict = {k: v.float() for k, v in loss_dict.items()}
    loss = losses.weighted_total(loss_dict, weights)
    optimizer.zero_grad(set_to_none=True)
    if not ddp.all_ranks_agree(torch.isfinite(loss), device):
        return None, loss_dict
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update(model, step)
    return loss, loss_dict


def set_lr(optimizer, step, warmup, progress=None):
    """Every group's LR at this step, as a factor of its initial_lr: a linear warm-up from 0.001x over `warmup`
    steps; with progress (SCHEDULE cosine: the share of the run's budget used, 0 to 1) times
    0.5 (1 + cos(pi progress)) at every step, so the LR reaches 0 where the budget ends. Without progress
    (plateau) the LR is left to the plateau scheduler once warmed up."""
    if progress is None and step >= warmup:
        return
    factor = 0.001 + 0.999 * (step + 1) / warmup if step < warmup else 1.0
    if progress is not None:
        factor *= 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


def budget_used(cfg, step, steps_per_epoch, deadline, device):
    """SCHEDULE cosine's progress: the larger share of the two budgets used, EPOCHS x steps_per_epoch steps and
    MAX_MINUTES of training (deadline: when it ends), the same on every process (the LR must not differ)."""
    used = step / max(cfg["EPOCHS"] * steps_per_epoch, 1)
    if deadline is not None and cfg["MAX_MINUTES"] > 0:
        used = max(used, 1 - (deadline - time.time()) / (cfg["MAX_MINUTES"] * 60))
    return ddp.max_over_ranks(used, device)


def train_one_epoch(model, loader, optimizer, device, cfg, state, weights, scaler=None, dtype=None, deadline=None,
                    ema=None):
    """One pass over the training split with train_step; returns the mean of each loss term and the number
    of steps skipped (non-finite loss). Under DDP the figures are over all processes. deadline: a time.time()
    at which the epoch ends early (MAX_MINUTES), on all processes alike. cfg: WARMUP_ITERS, SCHEDULE, GRAD_CLIP,
    EPOCHS, MAX_MINUTES."""
    device = torch.device(device)
    model.train()
    sums, steps, skipped_in_a_row, skipped = {}, 0, 0, 0
    warmup = min(cfg["WARMUP_ITERS"], len(loader))
    bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}/{cfg['EPOCHS']}", dynamic_ncols=True,
               disable=ddp.rank() != 0)
    t_last = time.time()
    for images, targets in bar:
        if deadline is not None and not ddp.all_ranks_agree(time.time() < deadline, device):
            break
        progress = budget_used(cfg, state["step"], len(loader), deadline, device) if cfg["SCHEDULE"] == "cosine" \
            else None  # plateau: the scheduler acts after the warm-up, per epoch
        set_lr(optimizer, state["step"], warmup, progress)
        images, targets = to_device(images, targets, device)
        state["step"] += 1
        loss, loss_dict = train_step(model, images, targets, optimizer, weights, scaler, dtype, cfg["GRAD_CLIP"], ema,
                                     state["step"])
        if loss is None:
            skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
            if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise FloatingPointError(
                    f"{skipped_in_a_row} consecutive non-finite losses ({ {k: v.item() for k, v in loss_dict.items()} }); "
                    "lower LR, raise WARMUP_ITERS or check the data")
            continue
        skipped_in_a_row, steps = 0, steps + 1
        for k, v in loss_dict.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["train_loss"] = sums.get("train_loss", 0.0) + loss.item()
        now = time.time()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", s_it=f"{now - t_last:.2f}")
        t_last = now
    stats = ddp.mean_over_ranks({k: v / max(steps, 1) for k, v in sums.items()}, steps, device)
    return stats, ddp.sum_over_ranks(skipped, device)


@torch.no_grad()
def validation_loss(model, loader, device, weights):
    """Mean weighted loss on the val split: torchvision computes losses only in train mode, so run
    train mode with every normalisation layer in eval mode (statistics untouched) and no gradients."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.eval()
    total, n = 0.0, 0
    for images, targets in loader:
        images, targets = to_device(images, targets, device)
        total += float(losses.weighted_total(model(images, targets), weights))
        n += 1
    model.eval()
    return total / max(n, 1)


def evaluate_model(model, dataset, device, opts, coco_gt=None, num_workers=0):
    """Leaderboard-style segm AP50 (maxDets 100) and AP@[.5:.95] of a model on a CellDataset at its own image
    size (sizing None), predicted as at test time (predict.py: sizing rule, tiles, TTA of opts; masks at
    opts' mask threshold). Returns (metrics, records)."""
    coco_gt = coco_gt if coco_gt is not None else evaluate.val_ground_truth(dataset)
    records = to_records(predict_dataset(model, dataset, device, opts, num_workers, desc="validate"),
                         opts["mask_threshold"])
    return evaluate.coco_evaluate(coco_gt, records, max_dets=100), records


def best_so_far(ap50, best_ap50):
    """best.pt's rule (train.py's for ours, peer.py's for the peer): are these weights the best so far, and the
    best val AP50 now. A NaN val AP50 (val images without cells) counts as none; until one has picked weights,
    the latest are the best."""
    score = -math.inf if math.isnan(ap50) else ap50
    return score > best_ap50 or best_ap50 == -math.inf, max(score, best_ap50)


def validate(model, loss_loader, val_set, device, weights, opts, coco_gt):
    """The epoch's validation figures: val loss, leaderboard AP50 and AP@[.5:.95]."""
    val_loss = validation_loss(model, loss_loader, device, weights)
    metrics, _ = evaluate_model(model, val_set, device, opts, coco_gt)
    return {"val_loss": val_loss, "val_ap50": metrics["ap50"], "val_ap": metrics["ap"]}
