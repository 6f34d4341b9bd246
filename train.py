"""Train the report's Mask R-CNN on HW3 cells.

    python train.py                                   # the recipe, on data/
    python train.py --epochs 3 --backbone resnet18 --pretrained false
    python train.py --run-dir runs/exp1 --resume      # continue runs/exp1 from last.pt
    python train.py --demo true                       # synthetic data, CPU-sized, then inference
    torchrun --nproc_per_node 2 train.py              # two GPUs (DistributedDataParallel), same constants

Every UPPER_CASE constant below can be set from the command line as --lower-case-with-dashes.
A run folder gets config.json, split.json, metrics.csv, learning_curve.png, last.pt and best.pt.
"""
import csv
import hashlib
import io
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from tqdm import tqdm

import evaluate
import infer
import losses
from dataset import (CellDataset, DataError, check_jitter, check_train_data, collate, list_train_ids, make_demo_data,
                     split_ids)
from model import COCO_MODEL as coco_model, HEADS as head_choices  # lower case: not constants of train.py
from model import PretrainedWeightsError, build_model, freeze_bn_setting, load_weights, parse_freeze_bn
from utils import (CheckpointError, apply_overrides, atomic_write, load_checkpoint, rng_state, save_checkpoint, save_json,
                   seed_everything, set_rng_state)

# ---- constants (each one can be overridden: --epochs 3, --pretrained false, ...) --------------
DATA_DIR = "data"
RUN_DIR = ""                  # '' = runs/<date-time>
BACKBONE = "seresnextaa101d_32x8d.sw_in12k_ft_in1k_288"  # any timm model name, or "torchvision/maskrcnn_resnet50_fpn_v2":
                              # torchvision's COCO Mask R-CNN v2 taken whole (COCO weights from its hub or PRETRAINED_WEIGHTS)
PRETRAINED = True             # true: ImageNet weights from timm's hub (COCO weights from torchvision's for the COCO model)
PRETRAINED_WEIGHTS = ""       # local weights file (Kaggle without internet); wins over the hub
FREEZE_BN = "auto"            # auto: frozen where pretrained weights were loaded (batch 1 makes live statistics
                              # noise), live for a random backbone (frozen, it could never learn); true | false
FPN_CHANNELS = 256
HEADS = "standard"            # standard: torchvision's box head | cascade: Cascade R-CNN's three stages (IoU 0.5/0.6/0.7,
                              # cascade.py)
ROI_BATCH_SIZE = 512          # RoIs sampled per image for the box head (torchvision default)
MIN_SIZE = 800                # shorter side resized to MIN_SIZE (torchvision's rule) ...
MAX_SIZE = 1333               # ... unless the longer side would pass MAX_SIZE; never a longer input side
SCALE = 0.0                   # > 0: resize every image by this fixed factor instead (2.0 = the top entries'
                              # 2x upscaling); training crops a random MAX_SIZE/SCALE window from larger
                              # images, inference tiles them (infer.py TILE)
SCALE_JITTER = [1.0, 1.0]     # [lo, hi]: each training image resized by a random factor in [lo, hi] times the sizing
                              # rule's, then cropped to at most MAX_SIZE ([0.5, 2.0]: the 0.639 entry's); [1, 1] = off
STAIN_AUG = 0.0               # probability of an H&E stain jitter (albumentations HEStain) + brightness/contrast
EMA = 0.0                     # decay of an exponential moving average of the weights (timm ModelEmaV3, warm-up aware),
                              # e.g. 0.999 (timm's warm-up keeps it below ~0.998 in a HW3-length run); validation,
                              # best.pt and infer.py use the average; 0 = off
EPOCHS = 50
MAX_MINUTES = 0.0             # > 0: also stop when training steps (validation not counted) have taken this long,
                              # mid-epoch if need be (a time budget; ablate.py --minutes)
BATCH_SIZE = 1
LR = "auto"                   # AdamW; auto: 5e-5 (the recipe's fine-tuning rate) with pretrained weights,
                              # 2e-4 for a backbone from scratch (measured: ~3x the AP50 of 5e-5 there)
WEIGHT_DECAY = 1e-3
WARMUP_ITERS = 500            # linear warm-up from LR/1000 (capped at one epoch)
LR_PATIENCE = 2               # ReduceLROnPlateau on val AP50 ...
LR_FACTOR = 0.5               # ... multiplies the LR by this
EARLY_STOP_PATIENCE = 7       # stop after this many epochs without a better val AP50
GRAD_CLIP = 10.0              # max gradient norm; 0 = off
AMP = "auto"                  # mixed precision for training: auto (GPU of capability >= 8.0: bf16; older GPUs
                              # such as T4/P100: fp16 + GradScaler; CPU: off) | fp16 | bf16 | off
VAL_FRACTION = 0.1
MIN_VAL_IMAGES = 5            # a smaller val split is logged but picks nothing (best.pt = latest weights, no LR
                              # plateau, no early stop): the AP50 of one or two images is noise
VAL_DETECTIONS_PER_IMAGE = 1000  # as the submission keeps
MASK_THRESHOLD = 0.5          # for validation AP
SEED = 42
LOSSES = "stock"              # loss preset: stock | ciou_dice_boundary | report (losses.py)
LOSS_WEIGHTS = {}             # {"loss_boundary": 0.5, ...}: overrides the preset's weight of a term
NUM_WORKERS = 2
DEVICE = "auto"               # auto | cpu | cuda | cuda:1 ... (under torchrun: each process its LOCAL_RANK GPU)
CUDNN_BENCHMARK = False       # true: cuDNN times kernels for every new input shape. Off: every image has its own
                              # size (and the mask head's RoI count changes every step), so it would re-tune
                              # again and again, with workspace spikes on a 16 GB T4 (README: AMP and speed)
RESUME = False                # continue RUN_DIR from its last.pt
DEMO = False                  # synthetic data + the CPU settings below, then inference
# ------------------------------------------------------------------------------------------------

# What --demo true changes (anything also given on the command line wins): a small backbone from
# scratch on ~130 px synthetic images, sized to finish on a 2-core CPU in a few minutes.
DEMO_SETTINGS = dict(
    DATA_DIR="data/demo", BACKBONE="resnet18", PRETRAINED=False, FREEZE_BN=False, FPN_CHANNELS=64,
    ROI_BATCH_SIZE=128, MIN_SIZE=128, MAX_SIZE=192, EPOCHS=10, BATCH_SIZE=2, LR=1e-3, WARMUP_ITERS=20,
    VAL_FRACTION=0.2, VAL_DETECTIONS_PER_IMAGE=200, NUM_WORKERS=0, EARLY_STOP_PATIENCE=5,
)
METRIC_FIELDS = ["epoch", "lr", "train_loss", *losses.LOSS_TERMS, "val_loss", "val_ap50", "val_ap",
                 "skipped_steps", "epoch_seconds", "train_seconds", "ema_decay"]
MAX_SKIPPED_STEPS = 20  # consecutive non-finite losses before giving up
AUTO_LR = {"pretrained": 5e-5, "scratch": 2e-4}  # LR "auto"


def resolve_config(argv=None):
    ns = {k: v for k, v in globals().items() if k.isupper() and k not in ("DEMO_SETTINGS", "METRIC_FIELDS",
                                                                         "MAX_SKIPPED_STEPS", "AUTO_LR")}
    cfg, given = apply_overrides(ns, argv, description=__doc__)
    on_command_line = set(given)
    ckpt = None
    if cfg["RESUME"] and cfg["RUN_DIR"]:  # a resumed run keeps its configuration, but for what is given now
        ckpt = load_checkpoint(Path(cfg["RUN_DIR"]) / "last.pt")
        cfg = {**cfg, **ckpt["config"], **{k: cfg[k] for k in given}, "RESUME": True}  # new constants: defaults
        given = set(ckpt["config"]) | given
    if cfg["DEMO"]:
        cfg.update({k: v for k, v in DEMO_SETTINGS.items() if k not in given})
    resolve_training_defaults(cfg, fresh=ckpt is None, forced_now="FREEZE_BN" in on_command_line)
    check_levers(cfg)
    if cfg["LOSSES"] not in losses.PRESETS:
        raise SystemExit(f"--losses {cfg['LOSSES']!r} is not a preset; choose one of {', '.join(losses.PRESETS)}")
    if not cfg["RUN_DIR"]:
        if cfg["RESUME"]:
            raise SystemExit("--resume needs --run-dir: the run folder to continue")
        cfg["RUN_DIR"] = f"runs/{'demo-' if cfg['DEMO'] else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, ckpt


def check_levers(cfg):
    """HEADS, SCALE_JITTER, STAIN_AUG and EMA: a bad value stops before anything is built."""
    if cfg["HEADS"] not in head_choices:
        raise SystemExit(f"--heads {cfg['HEADS']!r}: choose one of {', '.join(head_choices)}")
    if cfg["BACKBONE"] == coco_model and cfg["FPN_CHANNELS"] != 256:
        raise SystemExit(f"--backbone {coco_model} has 256 FPN channels: set --fpn-channels 256 "
                         f"(FPN_CHANNELS is {cfg['FPN_CHANNELS']})")
    try:
        cfg["SCALE_JITTER"] = list(check_jitter(cfg["SCALE_JITTER"]))
    except ValueError as e:
        raise SystemExit(f"--scale-jitter: {e}") from None
    if not 0 <= cfg["STAIN_AUG"] <= 1:
        raise SystemExit(f"--stain-aug {cfg['STAIN_AUG']}: a probability, 0 to 1")
    if not 0 <= cfg["EMA"] < 1:
        raise SystemExit(f"--ema {cfg['EMA']}: a decay in [0, 1), e.g. 0.999 (0 = off)")


def resolve_training_defaults(cfg, fresh=True, forced_now=False):
    """FREEZE_BN and LR as the run will use them (in place): 'auto' follows whether the backbone starts
    from pretrained weights. A new run that would freeze a random backbone's BatchNorm is refused, and so
    is resuming one (the old FREEZE_BN default did it) unless --freeze-bn is given now."""
    try:
        cfg["FREEZE_BN"] = parse_freeze_bn(cfg["FREEZE_BN"])
    except ValueError as e:
        raise SystemExit(f"--freeze-bn: {e}") from None
    pretrained = bool(cfg["PRETRAINED"] or cfg["PRETRAINED_WEIGHTS"])
    if fresh and cfg["FREEZE_BN"] is True and not pretrained:
        raise SystemExit("FREEZE_BN true with a randomly initialised backbone (--pretrained false, no "
                         "--pretrained-weights) would fix BatchNorm at its initial values for ever, and timm "
                         "zero-initialises the last BatchNorm of every residual block: every residual branch "
                         "would output zero. Use --freeze-bn auto (or false) to train from scratch.")
    if not fresh and cfg["FREEZE_BN"] is True and not pretrained and not forced_now:
        raise SystemExit("this run froze the BatchNorm of a randomly initialised backbone (the old FREEZE_BN "
                         "default), which keeps every residual branch of timm's backbone at zero. Continue it "
                         "with --freeze-bn false (live BatchNorm from here on; the weights load either way), "
                         "or with --freeze-bn true to keep it as it was.")
    if str(cfg["LR"]).strip().lower() == "auto":
        cfg["LR"] = AUTO_LR["pretrained" if pretrained else "scratch"]
    else:
        try:
            cfg["LR"] = float(cfg["LR"])
        except ValueError:
            raise SystemExit(f"--lr {cfg['LR']!r}: a number or auto") from None
    return cfg


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


def distributed():
    return dist.is_available() and dist.is_initialized()


def setup_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL, one GPU per process (LOCAL_RANK),
    or gloo on CPU. Returns (rank, world size, device); a plain `python train.py` gets (0, 1, DEVICE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, infer.pick_device(cfg["DEVICE"])
    local = int(os.environ["LOCAL_RANK"])
    if cfg["DEVICE"] != "cpu" and torch.cuda.is_available():
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    # rank 0 validates and saves while the others wait in the next collective: allow for a long validation
    dist.init_process_group(backend, timeout=timedelta(hours=2))
    return dist.get_rank(), world, device


def all_ranks_agree(flag, device):
    """True where every process says True (one tiny all-reduce; a plain run needs none)."""
    if not distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def max_over_ranks(value, device):
    """The largest of the processes' values (a plain run: its own)."""
    if not distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def mean_over_ranks(stats, steps, device):
    """Per-term training means weighted by each process's step count: the figures of the whole epoch."""
    if not distributed():
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] * steps for k in keys] + [float(steps)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / max(float(t[-1]), 1.0) for k, v in zip(keys, t[:-1])}


class PeerFailure(RuntimeError):
    """Another DDP process failed; this one stops instead of waiting in a collective for the timeout."""


def on_rank0(what, fn):
    """fn() on rank 0 (validation, saving), its result handed to every process. Where it raises, rank 0
    tells the others before re-raising, so they stop at once with a message naming rank 0 and its error
    instead of waiting in their next collective for the process-group timeout (hours)."""
    if not distributed():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, after the others were told
            error = e
    box = [result, None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise PeerFailure(f"rank 0 failed while {what} ({box[1]}); rank {dist.get_rank()} stops too")
    return box[0]


def make_train_loader(train_set, cfg, rank, world, device):
    """The training DataLoader of this process. Under DDP each process reads a shuffled 1/world share
    (DistributedSampler, the same permutation on every process, reshuffled by set_epoch), and draws its
    augmentation from its own stream: the loader's generator (which seeds the workers) starts at
    SEED + rank, so worker k of rank 0 and of rank 1 flip, rotate and crop differently.
    Returns (loader, sampler or None, generator)."""
    generator = torch.Generator().manual_seed(cfg["SEED"] + rank)
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg["SEED"])
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg["BATCH_SIZE"], shuffle=sampler is None, sampler=sampler, collate_fn=collate,
        generator=generator, num_workers=cfg["NUM_WORKERS"], pin_memory=device.type == "cuda",
        persistent_workers=cfg["NUM_WORKERS"] > 0)
    return loader, sampler, generator


def gather_rng(generator, device):
    """Every process's (rng_state, loader generator state), in rank order (rank 0 saves them all)."""
    mine = (rng_state(device), generator.get_state())
    if not distributed():
        return [mine]
    streams = [None] * dist.get_world_size()
    dist.all_gather_object(streams, mine)
    return streams


def restore_rng(ckpt, generator, rank, world, device, fallback_seed):
    """Put this process's random streams back from a checkpoint saved by any number of processes on any
    machine. Returns notes on what could not be restored."""
    streams = ckpt.get("rng_ranks") or [(ckpt["rng"], ckpt["loader_rng"])]  # older checkpoints: rank 0's
    notes = []
    if len(streams) != world:
        notes.append(f"the checkpoint holds the random streams of {len(streams)} process(es); this run has {world}")
    if rank < len(streams):
        state, loader_state = streams[rank]
        notes += set_rng_state(state, device, cuda_seed=fallback_seed + rank)
        generator.set_state(loader_state)
    else:
        seed_everything(fallback_seed + rank)
        generator.manual_seed(fallback_seed + rank)
        notes.append(f"no saved random state for rank {rank}: its streams start from seed {fallback_seed + rank}")
    return notes


def train_one_epoch(model, loader, optimizer, device, cfg, state, weights, scaler=None, dtype=None, deadline=None,
                    ema=None):
    """One pass over the training split; returns the mean of each loss term and the step count skipped.
    dtype: autocast dtype (None = full precision); scaler: a GradScaler for fp16. Under DDP the figures
    are over all processes, and a step is skipped on all of them when any one's loss is not finite.
    deadline: a time.time() at which the epoch ends early (MAX_MINUTES), on all processes alike.
    ema: a timm ModelEmaV3 of the bare model, updated after every optimiser step (rank 0's only)."""
    device = torch.device(device)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    model.train()
    sums, steps, skipped_in_a_row, skipped = {}, 0, 0, 0
    warmup = min(cfg["WARMUP_ITERS"], len(loader))
    rank0 = not distributed() or dist.get_rank() == 0
    bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}/{cfg['EPOCHS']}", dynamic_ncols=True, disable=not rank0)
    t_last = time.time()
    for images, targets in bar:
        if deadline is not None and not all_ranks_agree(time.time() < deadline, device):
            break
        if state["step"] < warmup:  # linear warm-up to the current LR (the plateau scheduler acts later)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * (0.001 + 0.999 * (state["step"] + 1) / warmup)
        images, targets = to_device(images, targets, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss_dict = model(images, targets)
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        loss = losses.weighted_total(loss_dict, weights)
        state["step"] += 1
        if not all_ranks_agree(torch.isfinite(loss), device):
            skipped += 1
            skipped_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise FloatingPointError(
                    f"{skipped_in_a_row} consecutive non-finite losses ({ {k: v.item() for k, v in loss_dict.items()} }); "
                    "lower LR, raise WARMUP_ITERS or check the data")
            continue
        skipped_in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["GRAD_CLIP"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["GRAD_CLIP"])
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:  # warm-up aware: the decay grows with the global step up to EMA
            ema.update(getattr(model, "module", model), step=state["step"])
        steps += 1
        for k, v in loss_dict.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["train_loss"] = sums.get("train_loss", 0.0) + loss.item()
        now = time.time()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        s_it=f"{now - t_last:.2f}")
        t_last = now
    stats = mean_over_ranks({k: v / max(steps, 1) for k, v in sums.items()}, steps, device)
    if distributed():
        t = torch.tensor([skipped], device=device)
        dist.all_reduce(t)
        skipped = int(t.item())
    return stats, skipped


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


def validate(net, loss_loader, val_set, device, weights, opts, mask_threshold, coco_gt):
    """The epoch's validation figures: val loss, leaderboard AP50 and AP@[.5:.95]."""
    val_loss = validation_loss(net, loss_loader, device, weights)
    metrics, _ = evaluate.evaluate(net, val_set, device, opts, mask_threshold, coco_gt)
    return {"val_loss": val_loss, "val_ap50": metrics["ap50"], "val_ap": metrics["ap"]}


def write_metrics(history, run_dir):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(Path(run_dir) / "metrics.csv", "w") as f:
        f.write(buf.getvalue())


def plot_curves(history, path):
    """Learning curve: train/val loss (left axis) and val AP50 (right axis) per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [h.get("train_loss", math.nan) for h in history], "o-", label="train loss")  # none: no step ran
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_ap50"] for h in history], "^-", color="tab:green", label="val AP50")
    ax2.set_ylabel("val AP50 (segm, maxDets 100)")
    ax2.set_ylim(0, 1)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], loc="center right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def check_ranks_in_sync(model):
    """After DDP training every process must hold the same parameters (the saved ones are rank 0's):
    compare a SHA-256 of each process's parameters. Returns the digest."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP processes ended with different weights: {digests}")
    return digests[0]


def main(argv=None):
    cfg, ckpt = resolve_config(argv)  # ckpt: the run's last.pt when resuming
    rank, world, device = setup_distributed(cfg)
    try:
        if distributed():  # a default runs/<time> may differ by a second between processes: take rank 0's
            name = [cfg["RUN_DIR"]]
            dist.broadcast_object_list(name, src=0)
            cfg["RUN_DIR"] = name[0]
        return train(cfg, ckpt, rank, world, device)
    finally:
        if distributed():
            dist.destroy_process_group()


def train(cfg, ckpt, rank, world, device):
    log = print if rank == 0 else (lambda *a, **k: None)
    run_dir = Path(cfg["RUN_DIR"])
    def make_demo():
        if not (Path(cfg["DATA_DIR"]) / "train").is_dir():
            print(f"making the synthetic demo dataset in {cfg['DATA_DIR']}")
            make_demo_data(cfg["DATA_DIR"], seed=cfg["SEED"])
    if cfg["DEMO"]:  # rank 0 makes it; the others wait for it (or its error)
        on_rank0("making the demo data", make_demo)
    if (run_dir / "last.pt").exists() and not cfg["RESUME"]:
        raise SystemExit(f"{run_dir} already holds a run (last.pt); continue it with --resume, "
                         "or choose another --run-dir")
    seed_everything(cfg["SEED"] + rank)  # the same initial weights are broadcast from rank 0 by DDP
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg["CUDNN_BENCHMARK"]

    # ---- data ------------------------------------------------------------------------------------
    all_ids = list_train_ids(cfg["DATA_DIR"])
    summary = check_train_data(cfg["DATA_DIR"], all_ids)
    log(f"data {cfg['DATA_DIR']}: {summary['images']} images, instances per class {summary['instances']}"
        + (f"; {len(summary['negatives'])} image(s) without class files kept as negative examples"
           f" (e.g. {summary['negatives'][0]})" if summary["negatives"] else ""))
    if ckpt is not None:
        train_ids, val_ids = ckpt["train_ids"], ckpt["val_ids"]
    else:
        train_ids, val_ids = split_ids(all_ids, cfg["VAL_FRACTION"], cfg["SEED"])
    sizing = (cfg["MIN_SIZE"], cfg["MAX_SIZE"], cfg["SCALE"])
    train_set = CellDataset(cfg["DATA_DIR"], train_ids, train=True, sizing=sizing, jitter=cfg["SCALE_JITTER"],
                            stain=cfg["STAIN_AUG"])
    val_set = CellDataset(cfg["DATA_DIR"], val_ids, train=False)  # own size: scored as at test time
    train_loader, sampler, generator = make_train_loader(train_set, cfg, rank, world, device)
    loss_loader = infer.in_order_loader(CellDataset(cfg["DATA_DIR"], val_ids, train=False, sizing=sizing),
                                   cfg["NUM_WORKERS"])

    # ---- model, optimiser, schedule --------------------------------------------------------------
    net = build_model(cfg, load_pretrained=not cfg["RESUME"],
                      detections_per_image=cfg["VAL_DETECTIONS_PER_IMAGE"]).to(device)
    weights = losses.preset_weights(cfg["LOSSES"], cfg["LOSS_WEIGHTS"])
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["LR"], weight_decay=cfg["WEIGHT_DECAY"])
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg["LR"]
    dtype, amp_why = amp_dtype(cfg["AMP"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg["LR_FACTOR"],
                                                           patience=cfg["LR_PATIENCE"])
    state = {"epoch": 0, "step": 0, "best_ap50": -math.inf, "bad_epochs": 0, "history": [], "stopped_early": False}
    ema_state = None  # the averaged weights of a resumed run

    if ckpt is not None:
        load_weights(net, ckpt, run_dir / "last.pt")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        ema_state = ckpt.get("ema")
        for note in restore_rng(ckpt, generator, rank, world, device, cfg["SEED"] + 1000 * state["epoch"]):
            print(f"rank {rank}: resume: {note}")
        del ckpt
        best = state["best_ap50"]
        log(f"resumed {run_dir} after epoch {state['epoch']} (best val AP50 "
            + (f"{best:.4f})" if best > -math.inf else "n/a: no val AP50 has picked a checkpoint yet)"))
    # EMA: rank 0 keeps the average (it validates and saves; every process holds the same weights)
    ema = ModelEmaV3(net, decay=cfg["EMA"], use_warmup=True) if cfg["EMA"] > 0 and rank == 0 else None
    if ema_state is not None and ema is None and rank == 0:
        log("resume with EMA 0: the checkpoint's averaged weights are dropped; from here on validation, best.pt "
            "and infer.py use the trained weights (best val AP50 so far was the average's)")
    if ema is not None:
        if ema_state is not None:
            ema.module.load_state_dict(ema_state)
        log(f"EMA of the weights, decay {cfg['EMA']:g} (warm-up: 1 - (1 + step)^-2/3 until then, so 0.997 at step "
            "6000, 0.999 at 32k; metrics.csv ema_decay); validation, best.pt and infer.py use the average"
            + ("" if state["step"] == 0 or ema_state is not None else
               f"; this run's checkpoint had none: it starts from the weights of step {state['step']}"))
    if rank == 0:  # config.json: the run's constants and, for this session, the precision it trains in
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json({**cfg, "amp_dtype": str(dtype).replace("torch.", "") if dtype else "float32", "amp_why": amp_why},
                  run_dir / "config.json")
        if not (run_dir / "split.json").exists():
            save_json({"train": train_ids, "val": val_ids, "seed": cfg["SEED"]}, run_dir / "split.json")
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"run {run_dir}: {len(train_ids)} train / {len(val_ids)} val images, backbone {cfg['BACKBONE']}, "
        f"device {device}" + (f" x {world} processes (DDP)" if world > 1 else "")
        + f", AMP {str(dtype).replace('torch.', '') if dtype else 'off'} ({amp_why}), input "
        + (f"x{cfg['SCALE']:g} (random {int(cfg['MAX_SIZE'] / cfg['SCALE'])}-px crops of larger images)"
           if cfg["SCALE"] > 0 else f"MIN_SIZE {cfg['MIN_SIZE']}") + f", at most {cfg['MAX_SIZE']} px a side")

    start = "pretrained" if cfg["PRETRAINED"] or cfg["PRETRAINED_WEIGHTS"] else "scratch"
    log(f"{freeze_bn_setting(cfg)[1]}; LR {cfg['LR']:g}"
        + (f" (LR auto's rate for a {'pretrained' if start == 'pretrained' else 'random'} backbone)"
           if cfg["LR"] == AUTO_LR[start] else ""))
    select = len(val_set) >= cfg["MIN_VAL_IMAGES"]  # does val AP50 pick best.pt, the LR and early stopping?
    if len(val_set) and not select:
        log(f"val split of {len(val_set)} image(s) < MIN_VAL_IMAGES {cfg['MIN_VAL_IMAGES']}: its AP50 is logged "
            "but picks nothing (best.pt = the latest weights, fixed LR, no early stop)")
    opts = infer.predict_options(cfg, detections_per_image=cfg["VAL_DETECTIONS_PER_IMAGE"])
    coco_gt = evaluate.val_ground_truth(val_set) if len(val_set) and rank == 0 else None  # rank 0 validates
    if state["stopped_early"] or state["epoch"] >= cfg["EPOCHS"]:
        log(f"{run_dir} has finished training (epoch {state['epoch']}); nothing to do")
    budget = cfg["MAX_MINUTES"] * 60
    out_of_time = lambda: budget > 0 and state.get("train_seconds", 0.0) >= budget  # noqa: E731
    if out_of_time():
        log(f"{run_dir} has used its MAX_MINUTES {cfg['MAX_MINUTES']:g} of training; nothing to do")
    while not state["stopped_early"] and state["epoch"] < cfg["EPOCHS"] and not out_of_time():
        t0 = time.time()
        if sampler is not None:
            sampler.set_epoch(state["epoch"])
        deadline = t0 + budget - state.get("train_seconds", 0.0) if budget > 0 else None
        train_stats, skipped = train_one_epoch(model, train_loader, optimizer, device, cfg, state, weights,
                                               scaler, dtype, deadline, ema)
        # every process adds the same (slowest) figure, so all agree on the budget and stop together
        state["train_seconds"] = state.get("train_seconds", 0.0) + max_over_ranks(time.time() - t0, device)
        state["epoch"] += 1
        row = {"epoch": state["epoch"], "lr": optimizer.param_groups[0]["lr"], "skipped_steps": skipped,
               **({"ema_decay": ema.get_decay(state["step"])} if ema is not None else {}),  # in force; none: no EMA
               **train_stats, "val_loss": float("nan"), "val_ap50": float("nan"), "val_ap": float("nan")}
        if len(val_set):  # rank 0 validates; the others get its figures (or its error)
            scored = ema.module if ema is not None else net  # the weights best.pt and infer.py will use
            row.update(on_rank0("validating", lambda: validate(scored, loss_loader, val_set, device, weights, opts,
                                                               cfg["MASK_THRESHOLD"], coco_gt)))
        improved = True  # with no (or too small a) val split, the latest weights are the best we know
        if select:
            ap50 = row["val_ap50"] if not math.isnan(row["val_ap50"]) else -math.inf
            improved = ap50 > state["best_ap50"]
            scheduler.step(ap50)  # every process steps the same schedule and early stop
            if improved:
                state["best_ap50"], state["bad_epochs"] = ap50, 0
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= cfg["EARLY_STOP_PATIENCE"]:
                    state["stopped_early"] = True
                    log(f"early stop: no better val AP50 for {state['bad_epochs']} epochs")
        row["epoch_seconds"], row["train_seconds"] = time.time() - t0, state["train_seconds"]
        state["history"].append(row)
        streams = gather_rng(generator, device)

        def save():
            ckpt = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "state": state, "config": cfg,
                    "epoch": state["epoch"], "train_ids": train_ids, "val_ids": val_ids, "rng": streams[0][0],
                    "loader_rng": streams[0][1], "rng_ranks": streams}
            if ema is not None:  # infer.py predicts with these (model.load_weights(averaged=True))
                ckpt["ema"] = ema.module.state_dict()
            if improved:
                save_checkpoint(ckpt, run_dir / "best.pt")
            save_checkpoint(ckpt, run_dir / "last.pt")
            write_metrics(state["history"], run_dir)
            plot_curves(state["history"], run_dir / "learning_curve.png")
        on_rank0("saving the checkpoint", save)
        log(f"epoch {state['epoch']}: train loss {row.get('train_loss', float('nan')):.4f}  "
            f"val loss {row['val_loss']:.4f}  val AP50 {row['val_ap50']:.4f}  AP {row['val_ap']:.4f}  "
            f"lr {row['lr']:.2e}  {row['epoch_seconds']:.0f}s" + ("  (best)" if improved else ""))
    if distributed():
        digest = check_ranks_in_sync(net)
        log(f"DDP: the {world} processes hold identical weights (parameters sha256 {digest[:16]})")
    log(f"done after {state['epoch']} epochs: " + (f"best val AP50 {state['best_ap50']:.4f}" if select else
        "best.pt = the latest weights") + f"; {run_dir}/best.pt")

    if cfg["DEMO"] and rank == 0:
        infer.main(["--checkpoint", str(run_dir / "best.pt"), "--output-json", str(run_dir / "test-results.json"),
                    "--num-workers", "0", "--detections-per-image", str(cfg["VAL_DETECTIONS_PER_IMAGE"])])
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except (DataError, PretrainedWeightsError, FloatingPointError, CheckpointError, PeerFailure, OSError) as e:
        raise SystemExit(f"error: {e}") from None
