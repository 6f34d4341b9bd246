"""The training engine: the AMP rule, the one training step, an epoch of steps, the weight average (EMA),
and validation (loss, then predict + score). train.py wires these; bench/peer.py and the benchmarks under bench/
call the same train_step, so what they time is what users run (as torchvision's references/detection keep
engine.py apart from train.py).
"""
import math
import sys
import time
from contextlib import nullcontext

import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

import ddp
import evaluate
import losses
from predict import predict_dataset, to_records

MAX_SKIPPED_STEPS = 20  # consecutive non-finite losses or gradient norms before a run gives up
MAX_OOM_STEPS = 3  # consecutive out-of-memory training steps before a run gives up (with advice)


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


class StepOutOfMemory(RuntimeError):
    """A training step ran out of GPU memory on this process (here) or on another (DDP); every process skipped it."""

    def __init__(self, here):
        super().__init__("out of GPU memory" + ("" if here else " on another process"))
        self.here = here


class OutOfMemoryStop(RuntimeError):
    """MAX_OOM_STEPS training steps in a row ran out of GPU memory: the run stops with advice."""


def _free_step(optimizer, device):
    """What a failed step leaves: its gradients, and (on a GPU) the allocator's cached blocks."""
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_step(model, images, targets, optimizer, weights, scaler=None, dtype=None, grad_clip=0.0, ema=None,
               step=0):
    """One optimiser step: forward under autocast (dtype None: full precision), the weighted loss in fp32,
    backward through the GradScaler (fp16), gradient-norm clipping (grad_clip > 0), the optimiser step and
    the weight average's update.

    A step is skipped on every process (DDP) where on any of them the loss or the gradient norm is not finite
    (without a GradScaler an infinite gradient would pass clipping into AdamW and write NaN into the weights;
    with one, the scaler also lowers its scale), and a CUDA out-of-memory error in the forward or backward
    raises StepOutOfMemory on every process after the step's memory is freed. Under DDP the gradients are
    averaged after those checks (no_sync, then ddp.average_gradients), so no process waits in an all-reduce
    that another left for an error.
    Returns (total loss or None where skipped, {term: loss})."""
    device = images[0].device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    optimizer.zero_grad(set_to_none=True)
    sync = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else nullcontext()
    loss, loss_dict, oom = None, {}, False
    with sync:
        try:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss_dict = model(images, targets)
            loss = losses.weighted_total({k: v.float() for k, v in loss_dict.items()}, weights)
            loss_dict = {k: v.detach().float() for k, v in loss_dict.items()}  # the graph lives in `loss` alone
        except torch.cuda.OutOfMemoryError:
            oom = True
        fine = not oom and bool(torch.isfinite(loss))
        if not ddp.all_ranks_agree(fine, device):
            loss = None  # frees the graph
            _free_step(optimizer, device)
            if not ddp.all_ranks_agree(not oom, device):  # every process asks, so the collectives pair up
                raise StepOutOfMemory(oom)
            return None, loss_dict
        try:
            scaler.scale(loss).backward()
        except torch.cuda.OutOfMemoryError:
            oom = True
    if not ddp.all_ranks_agree(not oom, device):
        loss = None
        _free_step(optimizer, device)
        raise StepOutOfMemory(oom)
    params = [p for p in model.parameters() if p.requires_grad]
    ddp.average_gradients(params)
    scaler.unscale_(optimizer)  # a no-op without a scaler
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if not ddp.all_ranks_agree(bool(torch.isfinite(norm)), device):
        if scaler.is_enabled():  # no optimiser step; the scaler lowers its scale where unscale_ found an inf
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return None, loss_dict
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


def describe_batch(loader, targets):
    """'image <id> (input HxW, N cells)' of each image of a training batch, for a message."""
    ids = getattr(loader.dataset, "ids", None)
    return ", ".join(
        f"image {ids[t['image_id']] if ids is not None and 'image_id' in t else '?'} (input "
        f"{'x'.join(str(v) for v in t['masks'].shape[-2:]) if 'masks' in t else '?'}, {len(t.get('labels', []))} cells)"
        for t in targets)


OOM_ADVICE = ("lower train.py MAX_SIZE (the largest input side; with SCALE > 0 also the crop), SCALE, or "
              "ROI_BATCH_SIZE, or use fewer cells an image (SCALE > 0 crops); infer.py's RPN_PROPOSALS is test-time only")


def train_one_epoch(model, optimizer, loader, device, state, cfg, *, weights, scaler=None, dtype=None,
                    deadline=None, ema=None, clock=None):
    """One pass over the training split with train_step; returns the mean of each loss term (over all DDP
    processes) and the steps skipped, {'skipped_steps': non-finite loss or gradient norm, 'oom_steps': out of GPU
    memory on any process}. deadline: a time.time() at which the epoch ends early (MAX_MINUTES, RUN_MINUTES), on all
    processes alike. clock: a RunClock told each step's seconds. cfg: WARMUP_ITERS, SCHEDULE, GRAD_CLIP, EPOCHS,
    MAX_MINUTES.

    A skipped step is as if its batch had not been drawn: state['step'] (the warm-up, a cosine schedule's step
    count and the EMA's warm-up all read it) advances only where the weights were updated. MAX_SKIPPED_STEPS
    non-finite steps in a row, or MAX_OOM_STEPS out-of-memory steps in a row, stop the run with advice."""
    device = torch.device(device)
    model.train()
    sums, steps, in_a_row, skipped, oom, oom_in_a_row = {}, 0, 0, 0, 0, 0
    warmup = min(cfg["WARMUP_ITERS"], len(loader))
    bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}/{cfg['EPOCHS']}", dynamic_ncols=True,
               disable=ddp.rank() != 0)
    t_last = time.time()
    for images, targets in bar:
        timed = deadline is not None or (clock is not None and clock.budget > 0)
        if timed and not ddp.all_ranks_agree(time.time() < (deadline or math.inf) and not (clock and clock.must_stop()),
                                             device):
            break
        progress = budget_used(cfg, state["step"], len(loader), deadline, device) if cfg["SCHEDULE"] == "cosine" \
            else None  # plateau: the scheduler acts after the warm-up, per epoch
        set_lr(optimizer, state["step"], warmup, progress)
        images, targets = to_device(images, targets, device)
        try:
            loss, loss_dict = train_step(model, images, targets, optimizer, weights, scaler, dtype, cfg["GRAD_CLIP"],
                                         ema, state["step"] + 1)
        except StepOutOfMemory as e:
            oom, oom_in_a_row = oom + 1, oom_in_a_row + 1
            message = (f"out of GPU memory on {describe_batch(loader, targets)}" if e.here else str(e)) \
                + f": step skipped ({oom_in_a_row} in a row)"
            print(f"rank {ddp.rank()}: {message}; if it recurs, {OOM_ADVICE}", file=sys.stderr, flush=True)
            if oom_in_a_row >= MAX_OOM_STEPS:
                raise OutOfMemoryStop(f"{message}: stopping after {MAX_OOM_STEPS} in a row. To go on: {OOM_ADVICE}; "
                                      "then --resume (the last finished epoch's last.pt is kept)") from None
            t_last = time.time()
            continue
        oom_in_a_row = 0
        if loss is None:
            skipped, in_a_row, t_last = skipped + 1, in_a_row + 1, time.time()
            if in_a_row >= MAX_SKIPPED_STEPS:
                terms = {k: v.item() for k, v in loss_dict.items()}
                what = "losses" if not all(math.isfinite(v) for v in terms.values()) else "gradient norms"
                raise FloatingPointError(f"{in_a_row} consecutive non-finite {what} ({terms}); "
                                         "lower LR, raise WARMUP_ITERS or check the data")
            continue
        in_a_row, steps, state["step"] = 0, steps + 1, state["step"] + 1
        for k, v in loss_dict.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["train_loss"] = sums.get("train_loss", 0.0) + loss.item()
        now = time.time()
        if clock is not None and clock.step_done(now - t_last) and ddp.rank() == 0:
            tqdm.write(clock.plan(state["epoch"]))  # once, after the first warm steps
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", s_it=f"{now - t_last:.2f}")
        t_last = now
    stats = ddp.mean_over_ranks({k: v / max(steps, 1) for k, v in sums.items()}, steps, device)
    # every process skipped the same steps: the count is any one's
    return stats, {"skipped_steps": int(ddp.max_over_ranks(skipped, device)),
                   "oom_steps": int(ddp.max_over_ranks(oom, device))}


@torch.no_grad()
def validation_loss(model, loader, device, weights):
    """Mean weighted loss on the val split: torchvision computes losses only in train mode, so run
    train mode with every normalisation layer in eval mode (statistics untouched) and no gradients. An image
    that runs out of GPU memory is left out of the mean, said once."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.eval()
    total, n, left_out = 0.0, 0, []
    for images, targets in loader:
        images, targets = to_device(images, targets, device)
        failed = False
        try:
            total += float(losses.weighted_total(model(images, targets), weights))
            n += 1
        except torch.cuda.OutOfMemoryError:
            failed = True
        if failed:  # outside the except block, so the failed forward's tensors are already released
            left_out.append(describe_batch(loader, targets))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if left_out:
        print(f"val loss: out of GPU memory on {len(left_out)} image(s), left out of the mean: {'; '.join(left_out)}",
              file=sys.stderr)
    model.eval()
    return total / max(n, 1) if n else float("nan")


def evaluate_model(model, dataset, device, opts, coco_gt=None, num_workers=0):
    """Leaderboard-style segm AP50 (maxDets 100) and AP@[.5:.95] of a model on a CellDataset at its own image
    size (sizing None), predicted as at test time (predict.py: sizing rule, tiles, TTA of opts; masks at
    opts' mask threshold). Returns (metrics, records)."""
    coco_gt = coco_gt if coco_gt is not None else evaluate.val_ground_truth(dataset)
    records = to_records(predict_dataset(model, dataset, device, opts, num_workers, desc="validate"),
                         opts["mask_threshold"])
    return evaluate.coco_evaluate(coco_gt, records, max_dets=100), records


def best_so_far(ap50, best_ap50):
    """best.pt's rule (train.py's for ours, bench/peer.py's for the peer): are these weights the best so far, and the
    best val AP50 now. A NaN val AP50 (val images without cells) counts as none; until one has picked weights,
    the latest are the best."""
    score = -math.inf if math.isnan(ap50) else ap50
    return score > best_ap50 or best_ap50 == -math.inf, max(score, best_ap50)


def validate(model, loss_loader, val_set, device, weights, opts, coco_gt):
    """The epoch's validation figures: val loss, leaderboard AP50 (and each class's: val_ap50_class1..4),
    AP@[.5:.95], and the seconds it took in all and to predict one image."""
    t0 = time.time()
    val_loss = validation_loss(model, loss_loader, torch.device(device), weights)
    t1 = time.time()
    metrics, _ = evaluate_model(model, val_set, device, opts, coco_gt)
    t2 = time.time()
    return {"val_loss": val_loss, "val_ap50": metrics["ap50"], "val_ap": metrics["ap"],
            **{f"val_ap50_class{k}": v for k, v in metrics["per_class_ap50"].items()},
            "val_seconds": t2 - t0, "val_seconds_per_image": (t2 - t1) / max(len(val_set), 1)}
