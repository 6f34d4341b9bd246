"""Train the report's Mask R-CNN on HW3 cells.

    python train.py                                  # the recipe, on data/
    python train.py --epochs 3 --backbone resnet18 --pretrained false
    python train.py --run-dir runs/exp1 --resume     # continue runs/exp1 from last.pt
    python train.py --run-minutes 600                # stop in time: validation and saves included
    python train.py --demo true                      # synthetic data, CPU-sized, then inference
    torchrun --nproc_per_node 2 train.py             # two GPUs (DistributedDataParallel)

Each constant below can be set on the command line as --lower-case-with-dashes VALUE.
The run folder gets train.log, config.json, split.json, metrics.csv, learning_curve.png, last.pt
and best.pt. Why the defaults are what they are: docs/levers.md, docs/sizing.md, docs/gpu.md.
This file wires data (dataset.py), the model (model.py), the training step and validation
(engine.py), the clock (clock.py) and DDP (ddp.py).
"""
import math
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import torch

import ddp
import engine
import evaluate
import infer
import losses
from dataset import (CellDataset, DataError, check_jitter, check_train_data, collate, list_train_ids, make_demo_data,
                     split_ids)
from model import (COCO_MODEL, PretrainedWeightsError, build_model, check_config, freeze_bn_setting,
                   freeze_fpn_bn_setting, load_weights, parse_freeze_bn, set_thresholds)
from clock import RunClock, hours_minutes
from predict import PredictionMemoryError, in_order_loader, predict_options, tta_passes
from utils import (CHECKPOINT_FORMAT, NUM_CLASSES, CheckpointError, apply_overrides, config_block, load_checkpoint, save_checkpoint,
                   save_figure, save_json, seed_everything, tee_output, write_csv)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

# ---- what "auto" resolves to: pretrained (weights loaded) or scratch; why: docs/levers.md#the-auto-defaults
AUTO_LR = {"pretrained": 5e-5, "scratch": 2e-4}  # LR
AUTO_SCALE = {"pretrained": 0.0, "scratch": 1.0}  # SCALE
AUTO_ROI_BATCH_SIZE = {"pretrained": 512, "scratch": 128}  # ROI_BATCH_SIZE

# ---- config: run
DATA_DIR = "data"             # dataset root (layout: data/README.md)
RUN_DIR = ""                  # run folder; '' = runs/<date-time> (--demo: runs/demo-<date-time>)
RESUME = False                # continue RUN_DIR from its last.pt (also with a larger --epochs)
DEMO = False                  # synthetic data in data/demo, CPU-sized DEMO_SETTINGS, then inference
# ---- config: model
BACKBONE = "seresnextaa101d_32x8d.sw_in12k_ft_in1k_288"  # a timm model name, or
                              # "torchvision/maskrcnn_resnet50_fpn_v2" (torchvision's COCO Mask R-CNN)
PRETRAINED = True             # start from the hub's weights (ImageNet for timm, COCO for the COCO one)
PRETRAINED_WEIGHTS = ""       # local weights file (.safetensors/.pth), used instead of the hub
FREEZE_BN = "auto"            # backbone BatchNorm frozen: auto (if pretrained) | true | false
FREEZE_FPN_BN = "auto"        # COCO model's FPN BatchNorm frozen: auto (if frozen BN, batch < 8) | true | false
FPN_CHANNELS = 256            # FPN and RoI-head width (256 for the COCO model)
HEADS = "standard"            # box head: standard (torchvision's) | cascade (stages at IoU 0.5/0.6/0.7)
ROI_BATCH_SIZE = "auto"       # RoIs sampled an image for the box head (<= 25% cells): >= 4 | auto
LOSSES = "stock"              # loss preset: stock | ciou_dice_boundary | report (losses.py)
LOSS_WEIGHTS = {}             # a term's weight over the preset's, e.g. {"loss_boundary": 0.5}
# ---- config: input and augmentation
MIN_SIZE = 800                # SCALE 0: the shorter side resized to MIN_SIZE px ...
MAX_SIZE = 1333               # ... unless the longer passes MAX_SIZE; the longest input side (crops, tiles)
SCALE = "auto"                # input size factor: > 0 (large images cropped/tiled) | 0: MIN/MAX_SIZE | auto
SCALE_JITTER = [1.0, 1.0]     # [lo, hi]: each training image at random lo..hi times its size; [1, 1] = off
TO_GRAY = 0.1                 # probability of a to-gray training image; 0 = off
STAIN_AUG = 0.0               # probability of an HED stain plus brightness/contrast jitter; 0 = off
STAIN_STRENGTH = 0.05         # the stain jitter's strength s: each stain x [1-s, 1+s] plus [-s, s]
# ---- config: optimisation
EPOCHS = 50                   # at most this many epochs (early stopping may end sooner)
MAX_MINUTES = 0.0             # > 0: stop when training steps alone took this long; 0 = no limit
RUN_MINUTES = 0.0             # > 0: whole-run minutes, validation and saves included; 0 = no limit
RESERVE_PASSES = 0            # image passes predicted after training that RUN_MINUTES leaves time for
BATCH_SIZE = 1                # images per step (per process under torchrun)
LR = "auto"                   # AdamW learning rate | auto
WEIGHT_DECAY = 1e-3           # AdamW weight decay
WARMUP_ITERS = 500            # steps of linear warm-up from LR/1000 (at most one epoch)
SCHEDULE = "plateau"          # LR after warm-up: plateau (x LR_FACTOR on a plateau) | cosine (to 0 over EPOCHS)
LR_PATIENCE = 2               # plateau: epochs without a better val AP50 before the LR drops ...
LR_FACTOR = 0.5               # ... by this factor
EARLY_STOP_PATIENCE = 7       # stop after this many epochs without a better val AP50
GRAD_CLIP = 10.0              # max gradient norm; 0 = off
EMA = 0.0                     # decay of a weight average that validation and infer.py use (0.999); 0 = off
SEED = 42                     # initialisation, data order and augmentation
# ---- config: validation (predicts with infer.py's prediction constants)
VAL_FRACTION = 0.1            # share of training images held out for validation (0: best.pt = last.pt)
SPLIT_SEED = 42               # the seeded train/val split (seeds of one setting share it)
MIN_VAL_IMAGES = 5            # a smaller val split is scored but picks nothing (best.pt, LR, early stop)
VAL_DETECTIONS_PER_IMAGE = 1000  # detections kept a val image (infer.py's DETECTIONS_PER_IMAGE at test)
# ---- config: machine
AMP = "auto"                  # mixed precision: auto (bf16 on capability >= 8.0, fp16 on T4/P100, CPU off)
                              # | fp16 | bf16 | off
DEVICE = "auto"               # auto | cpu | cuda | cuda:1 ... (torchrun: each process its LOCAL_RANK GPU)
NUM_WORKERS = 2               # data-loading processes
CUDNN_BENCHMARK = False       # cuDNN kernel timing per new input shape (off: each image has its own size)
# ---- end of config

CONFIG = config_block(__file__)  # [(NAME, section, help)]
# What --demo true changes (anything also given on the command line wins): a small backbone from
# scratch on ~130 px synthetic images, sized to finish on a 2-core CPU in a few minutes.
DEMO_SETTINGS = dict(
    DATA_DIR="data/demo", BACKBONE="resnet18", PRETRAINED=False, FREEZE_BN=False, FPN_CHANNELS=64,
    ROI_BATCH_SIZE=128, MIN_SIZE=128, MAX_SIZE=192, EPOCHS=10, BATCH_SIZE=2, LR=1e-3, WARMUP_ITERS=20,
    VAL_FRACTION=0.2, VAL_DETECTIONS_PER_IMAGE=200, NUM_WORKERS=0, EARLY_STOP_PATIENCE=5,
)
SCHEDULES = ("plateau", "cosine")
METRIC_FIELDS = ["epoch", "lr", "train_loss", *losses.LOSS_TERMS, "val_loss", "val_ap50", "val_ap",
                 *[f"val_ap50_class{k}" for k in range(1, NUM_CLASSES + 1)], "skipped_steps", "oom_steps",
                 "step_seconds", "val_seconds", "val_seconds_per_image", "epoch_seconds", "train_seconds",
                 "elapsed_seconds", "gpu_peak_allocated_gb", "gpu_peak_reserved_gb", "ema_decay"]


# ---- configuration -------------------------------------------------------------------------------
def resolve_config(argv=None):
    """The run's configuration: the constants above, the command line over them; a resumed run's saved
    configuration over the defaults (what is given now wins); DEMO_SETTINGS under --demo; FREEZE_BN, LR, SCALE
    and ROI_BATCH_SIZE 'auto' resolved; bad values refused. Returns (cfg, the run's last.pt when resuming, else None)."""
    cfg, given = apply_overrides(globals(), CONFIG, argv, description=__doc__)
    on_command_line = set(given)
    ckpt = None
    if cfg["RESUME"] and cfg["RUN_DIR"]:  # a resumed run keeps its configuration, but for what is given now
        ckpt = load_checkpoint(Path(cfg["RUN_DIR"]) / "last.pt")
        saved = ckpt["config"]
        if "SCHEDULE" in given and "SCHEDULE" in saved and cfg["SCHEDULE"] != saved["SCHEDULE"]:
            raise SystemExit(f"--schedule {cfg['SCHEDULE']}: this run trained with SCHEDULE {saved['SCHEDULE']}, and a "
                             "resume cannot switch (the LR would go on from where the other schedule left it); "
                             "start a new run, or drop --schedule")
        cfg = {**cfg, **saved, **{k: cfg[k] for k in given}, "RESUME": True}  # new constants: defaults
        given = set(saved) | given
    if cfg["DEMO"]:
        cfg.update({k: v for k, v in DEMO_SETTINGS.items() if k not in given})
    resolve_training_defaults(cfg, fresh=ckpt is None)
    if "MIN_SIZE" in on_command_line and cfg["SCALE"] > 0:
        print(f"--min-size {cfg['MIN_SIZE']} is not used: SCALE {cfg['SCALE']:g} sizes the input (SCALE auto is 1 "
              "from scratch); --scale 0 for the MIN_SIZE/MAX_SIZE rule")
    check_levers(cfg)
    if cfg["LOSSES"] not in losses.PRESETS:
        raise SystemExit(f"--losses {cfg['LOSSES']!r} is not a preset; choose one of {', '.join(losses.PRESETS)}")
    if not cfg["RUN_DIR"]:
        if cfg["RESUME"]:
            raise SystemExit("--resume needs --run-dir: the run folder to continue")
        cfg["RUN_DIR"] = f"runs/{'demo-' if cfg['DEMO'] else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, ckpt


def check_levers(cfg):
    """HEADS, SCALE, SCALE_JITTER, TO_GRAY, STAIN_AUG, EMA, SCHEDULE and the budgets: a bad value stops before
    anything is built."""
    try:
        check_config(cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    try:
        cfg["SCALE_JITTER"] = list(check_jitter(cfg["SCALE_JITTER"]))
    except ValueError as e:
        raise SystemExit(f"--scale-jitter: {e}") from None
    if cfg["SCALE"] < 0:
        raise SystemExit(f"--scale {cfg['SCALE']:g}: a factor > 0, 0 (MIN_SIZE/MAX_SIZE's rule) or auto")
    if not 0 <= cfg["TO_GRAY"] <= 1:
        raise SystemExit(f"--to-gray {cfg['TO_GRAY']}: a probability, 0 to 1")
    if not 0 <= cfg["STAIN_AUG"] <= 1:
        raise SystemExit(f"--stain-aug {cfg['STAIN_AUG']}: a probability, 0 to 1")
    if not 0 <= cfg["STAIN_STRENGTH"] < 1:
        raise SystemExit(f"--stain-strength {cfg['STAIN_STRENGTH']}: 0 (no jitter) to below 1 (default 0.05)")
    if not 0 <= cfg["EMA"] < 1:
        raise SystemExit(f"--ema {cfg['EMA']}: a decay in [0, 1), e.g. 0.999 (0 = off)")
    if cfg["SCHEDULE"] not in SCHEDULES:
        raise SystemExit(f"--schedule {cfg['SCHEDULE']!r}: choose one of {', '.join(SCHEDULES)}")
    if cfg["RUN_MINUTES"] < 0 or cfg["MAX_MINUTES"] < 0:
        raise SystemExit(f"--run-minutes {cfg['RUN_MINUTES']:g} / --max-minutes {cfg['MAX_MINUTES']:g}: minutes >= 0 "
                         "(0 = no budget)")
    if cfg["RESERVE_PASSES"] < 0:
        raise SystemExit(f"--reserve-passes {cfg['RESERVE_PASSES']}: a number of image passes >= 0")


def resolve_training_defaults(cfg, fresh=True):
    """LR, SCALE, ROI_BATCH_SIZE and FREEZE_FPN_BN as the run will use them (in place): 'auto' follows whether
    the backbone starts from pretrained weights; FREEZE_BN is parsed only (model.freeze_bn_setting decides its
    'auto' when the model is built). A new run that would freeze a random backbone's BatchNorm is refused."""
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
    try:
        cfg["FREEZE_FPN_BN"] = freeze_fpn_bn_setting(cfg)  # after FREEZE_BN, which 'auto' follows
    except ValueError as e:
        raise SystemExit(f"--freeze-fpn-bn: {e}") from None
    start = "pretrained" if pretrained else "scratch"
    for name, auto in (("LR", AUTO_LR), ("SCALE", AUTO_SCALE)):
        if str(cfg[name]).strip().lower() == "auto":
            cfg[name] = auto[start]
        else:
            try:
                cfg[name] = float(cfg[name])
            except ValueError:
                raise SystemExit(f"--{name.lower()} {cfg[name]!r}: a number or auto") from None
    if str(cfg["ROI_BATCH_SIZE"]).strip().lower() == "auto":
        cfg["ROI_BATCH_SIZE"] = AUTO_ROI_BATCH_SIZE[start]
    elif not str(cfg["ROI_BATCH_SIZE"]).strip().isdecimal() or int(cfg["ROI_BATCH_SIZE"]) < 4:
        raise SystemExit(f"--roi-batch-size {cfg['ROI_BATCH_SIZE']!r}: a whole number >= 4 (e.g. 128, 512; torchvision "
                         f"samples int(0.25 x it) cells, none below 4) or auto")
    cfg["ROI_BATCH_SIZE"] = int(cfg["ROI_BATCH_SIZE"])
    return cfg




# ---- setup ---------------------------------------------------------------------------------------
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


def setup_data(cfg, ckpt, rank, world, device, log):
    """Every training file checked, the split (a resumed run keeps its own), the training loader, the val
    split at its own size (scored as the test set is) and at the input size (its loss)."""
    all_ids = list_train_ids(cfg["DATA_DIR"])
    summary = check_train_data(cfg["DATA_DIR"], all_ids)
    log(f"data {cfg['DATA_DIR']}: {summary['images']} images, instances per class {summary['instances']}"
        + (f"; {len(summary['negatives'])} image(s) without class files kept as negative examples"
           f" (e.g. {summary['negatives'][0]})" if summary["negatives"] else ""))
    if ckpt is not None:
        train_ids, val_ids = ckpt["train_ids"], ckpt["val_ids"]
    else:
        train_ids, val_ids = split_ids(all_ids, cfg["VAL_FRACTION"], cfg["SPLIT_SEED"])
    sizing = (cfg["MIN_SIZE"], cfg["MAX_SIZE"], cfg["SCALE"])
    train_set = CellDataset(cfg["DATA_DIR"], train_ids, train=True, sizing=sizing, jitter=cfg["SCALE_JITTER"],
                            to_gray=cfg["TO_GRAY"], stain=cfg["STAIN_AUG"], stain_strength=cfg["STAIN_STRENGTH"])
    loader, sampler, generator = make_train_loader(train_set, cfg, rank, world, device)
    return SimpleNamespace(
        train_ids=train_ids, val_ids=val_ids, loader=loader, sampler=sampler, generator=generator,
        val_set=CellDataset(cfg["DATA_DIR"], val_ids, train=False),
        loss_loader=in_order_loader(CellDataset(cfg["DATA_DIR"], val_ids, train=False, sizing=sizing),
                                    cfg["NUM_WORKERS"]))


def setup_training(cfg, ckpt, rank, world, device, generator, log):
    """The model (DDP-wrapped under torchrun), AdamW, the plateau schedule, the GradScaler, the weight
    average and the progress state; a resumed run gets all of them back from its last.pt, random streams too."""
    model = build_model(cfg, load_pretrained=not cfg["RESUME"]).to(device)
    val_settings = infer.prediction_settings(DETECTIONS_PER_IMAGE=cfg["VAL_DETECTIONS_PER_IMAGE"])
    set_thresholds(model, val_settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["LR"],
                                  weight_decay=cfg["WEIGHT_DECAY"])
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg["LR"]
    dtype, amp_why = engine.amp_dtype(cfg["AMP"], device)
    run = SimpleNamespace(
        model_without_ddp=model, model=model, optimizer=optimizer, dtype=dtype, amp_why=amp_why,
        val_settings=val_settings,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg["LR_FACTOR"],
                                                             patience=cfg["LR_PATIENCE"]),
        state={"epoch": 0, "step": 0, "best_ap50": -math.inf, "bad_epochs": 0, "history": [], "stopped_early": False})
    ema_state = None  # the averaged weights of a resumed run
    if ckpt is not None:
        load_weights(model, ckpt, Path(cfg["RUN_DIR"]) / "last.pt")
        optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        run.state, ema_state = ckpt["state"], ckpt.get("ema")
        for note in ddp.restore_rng(ckpt, generator, rank, world, device, cfg["SEED"] + 1000 * run.state["epoch"]):
            print(f"rank {rank}: resume: {note}")
        best = run.state["best_ap50"]
        log(f"resumed {cfg['RUN_DIR']} after epoch {run.state['epoch']} (best val AP50 "
            + (f"{best:.4f})" if best > -math.inf else "n/a: no val AP50 has picked a checkpoint yet)"))
    # rank 0 keeps the average (it validates and saves; every process holds the same weights)
    run.ema = engine.WeightAverage(model, cfg["EMA"] if rank == 0 else 0.0, ema_state)
    if ema_state is not None and not run.ema and rank == 0:
        log("resume with EMA 0: the checkpoint's averaged weights are dropped; from here on validation, best.pt "
            "and infer.py use the trained weights (best val AP50 so far was the average's)")
    if run.ema:
        log(f"EMA of the weights, decay {cfg['EMA']:g} (warm-up: 1 - (1 + step)^-2/3 until then, so 0.997 at step "
            "6000, 0.999 at 32k; metrics.csv ema_decay); validation, best.pt and infer.py use the average"
            + ("" if run.state["step"] == 0 or ema_state is not None else
               f"; this run's checkpoint had none: it starts from the weights of step {run.state['step']}"))
    if world > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                              else None)
    return run


def write_run_files(cfg, run, data):
    """config.json (the run's constants, this session's precision and how validation predicts) and split.json."""
    run_dir = Path(cfg["RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json({**cfg, "amp_dtype": str(run.dtype).replace("torch.", "") if run.dtype else "float32",
               "amp_why": run.amp_why, "VALIDATION": run.val_settings}, run_dir / "config.json")
    if not (run_dir / "split.json").exists():
        save_json({"train": data.train_ids, "val": data.val_ids, "seed": cfg["SPLIT_SEED"]}, run_dir / "split.json")


def log_start(cfg, run, data, device, world, log):
    start = "pretrained" if cfg["PRETRAINED"] or cfg["PRETRAINED_WEIGHTS"] else "scratch"
    auto = {name: f" (= {name} auto's for a {'pretrained' if start == 'pretrained' else 'random'} backbone)"
            if cfg[name] == table[start] else "" for name, table in (("LR", AUTO_LR), ("SCALE", AUTO_SCALE),
                                                                     ("ROI_BATCH_SIZE", AUTO_ROI_BATCH_SIZE))}
    log(f"run {cfg['RUN_DIR']}: {len(data.train_ids)} train / {len(data.val_ids)} val images, backbone "
        f"{cfg['BACKBONE']}, device {device}" + (f" x {world} processes (DDP)" if world > 1 else "")
        + f", AMP {str(run.dtype).replace('torch.', '') if run.dtype else 'off'} ({run.amp_why}), input "
        + (f"x{cfg['SCALE']:g} (random {int(cfg['MAX_SIZE'] / cfg['SCALE'])}-px crops of larger images)"
           if cfg["SCALE"] > 0 else f"MIN_SIZE {cfg['MIN_SIZE']}")
        + f"{auto['SCALE']}, at most {cfg['MAX_SIZE']} px a side")
    log(f"{freeze_bn_setting(cfg)[1]}"
        + (f"; FPN BatchNorm {'frozen' if cfg['FREEZE_FPN_BN'] else 'live'}" if cfg["BACKBONE"] == COCO_MODEL else "")
        + f"; {cfg['ROI_BATCH_SIZE']} RoIs an image{auto['ROI_BATCH_SIZE']}; LR {cfg['LR']:g}{auto['LR']}, "
        + ("cosine to 0 over the budget" if cfg["SCHEDULE"] == "cosine" else
           f"x{cfg['LR_FACTOR']:g} after more than {cfg['LR_PATIENCE']} epochs without a better val AP50"))
    if cfg["RUN_MINUTES"] > 0:
        log(f"RUN_MINUTES {cfg['RUN_MINUTES']:g}: training stops in time for its last validation and checkpoints"
            + (f" and {cfg['RESERVE_PASSES']} prediction passes after it" if cfg["RESERVE_PASSES"] else "")
            + ("; the cosine LR anneals over EPOCHS or MAX_MINUTES, not RUN_MINUTES" if cfg["SCHEDULE"] == "cosine"
               else ""))
    if len(data.val_set) and len(data.val_set) < cfg["MIN_VAL_IMAGES"]:
        log(f"val split of {len(data.val_set)} image(s) < MIN_VAL_IMAGES {cfg['MIN_VAL_IMAGES']}: its AP50 is logged "
            "but picks nothing (best.pt = the latest weights, " + ("no plateau halving" if cfg["SCHEDULE"] == "plateau"
                                                                   else "the cosine goes on") + ", no early stop)")


# ---- the fit loop --------------------------------------------------------------------------------
def fit(cfg, run, data, device, log, start):
    """Epochs until EPOCHS, early stopping, MAX_MINUTES or RUN_MINUTES: train, validate (rank 0), schedule, save.
    start: time.time() when this process started (RUN_MINUTES counts from it)."""
    state, budget = run.state, cfg["MAX_MINUTES"] * 60
    select = len(data.val_set) >= cfg["MIN_VAL_IMAGES"]  # does val AP50 pick best.pt, the LR and early stopping?
    opts = predict_options(cfg, run.val_settings)
    coco_gt = evaluate.val_ground_truth(data.val_set) if len(data.val_set) and ddp.rank() == 0 else None
    ceiling = evaluate.ceiling(coco_gt) if coco_gt is not None else None  # what maxDets 100 leaves reachable
    if ceiling is not None:
        log(f"val split: {evaluate.format_ceiling(ceiling)}")
    weights = losses.preset_weights(cfg["LOSSES"], cfg["LOSS_WEIGHTS"])
    clock = RunClock(cfg, len(data.loader), len(data.val_set), len(tta_passes(opts["tta"], opts["tta_scales"])),
                     start, state["history"], checkpoint_mb=2 * checkpoint_megabytes(run))
    out_of_time = lambda: budget > 0 and state.get("train_seconds", 0.0) >= budget  # noqa: E731
    planned = False
    if state["stopped_early"] or state["epoch"] >= cfg["EPOCHS"]:
        log(f"{cfg['RUN_DIR']} has finished training (epoch {state['epoch']}); nothing to do")
    if out_of_time():
        log(f"{cfg['RUN_DIR']} has used its MAX_MINUTES {cfg['MAX_MINUTES']:g} of training; nothing to do")
    while not state["stopped_early"] and state["epoch"] < cfg["EPOCHS"] and not out_of_time():
        if not ddp.all_ranks_agree(clock.room_for_an_epoch(), device):
            log(f"RUN_MINUTES {cfg['RUN_MINUTES']:g}: no time left for another epoch ({clock.eta(state['epoch'])}; "
                f"{hours_minutes(clock.reserve())} kept for {cfg['RESERVE_PASSES']} prediction passes); continue "
                "later with --resume (a resume gets its own RUN_MINUTES)")
            break
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if data.sampler is not None:
            data.sampler.set_epoch(state["epoch"])
        deadline = t0 + budget - state.get("train_seconds", 0.0) if budget > 0 else None
        stats, faults = engine.train_one_epoch(run.model, run.optimizer, data.loader, device, state, cfg,
                                               weights=weights, scaler=run.scaler, dtype=run.dtype,
                                               deadline=deadline, ema=run.ema, clock=clock)
        # every process adds the same (slowest) figure, so all agree on the budget and stop together
        state["train_seconds"] = state.get("train_seconds", 0.0) + ddp.max_over_ranks(time.time() - t0, device)
        state["epoch"] += 1
        cut = not ddp.all_ranks_agree(not clock.must_stop(), device)  # every process leaves the loop together
        row = {"epoch": state["epoch"], "lr": run.optimizer.param_groups[0]["lr"], **faults,
               "step_seconds": clock.step_seconds(),
               **({"ema_decay": run.ema.decay(state["step"])} if run.ema else {}),  # in force; none: no EMA
               **stats, "val_loss": float("nan"), "val_ap50": float("nan"), "val_ap": float("nan")}
        if len(data.val_set):  # rank 0 validates the weights best.pt and infer.py use; the others get its figures
            row.update(ddp.on_rank0("validating", lambda: engine.validate(
                run.ema.scored(run.model_without_ddp), data.loss_loader, data.val_set, device, weights, opts, coco_gt)))
            clock.validated(row["val_seconds"], row["val_seconds_per_image"])
        improved = step_schedule(cfg, run, row["val_ap50"], log) if select else True  # no val: latest = best
        row["epoch_seconds"], row["train_seconds"] = time.time() - t0, state["train_seconds"]
        row["elapsed_seconds"] = time.time() - start
        if device.type == "cuda":
            row["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        state["history"].append(row)
        streams = ddp.gather_rng(data.generator, device)
        t_save = time.time()
        ddp.on_rank0("saving the checkpoint", lambda: save_epoch(cfg, run, data, streams, improved))
        clock.saved(ddp.max_over_ranks(time.time() - t_save, device))
        log(epoch_line(row, ceiling, improved, clock, state["epoch"]))
        if not planned:  # the first epoch of this process: its validation and save now timed
            log(clock.plan(state["epoch"]))
            planned = True
        if cut:
            log(f"RUN_MINUTES {cfg['RUN_MINUTES']:g}: training steps stopped in epoch {state['epoch']} to leave time "
                "for its validation, checkpoints" + (f" and {cfg['RESERVE_PASSES']} prediction passes"
                                                    if cfg["RESERVE_PASSES"] else "")
                + "; continue later with --resume")
            break
    return select


def checkpoint_megabytes(run):
    """Megabytes of one checkpoint: the weights, their average and AdamW's two moments of each trained weight."""
    weights = sum(t.numel() * t.element_size() for t in run.model_without_ddp.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in run.model_without_ddp.parameters() if p.requires_grad)
    return (weights * (2 if run.ema else 1) + 2 * trained) / 2**20


def epoch_line(row, limit, improved, clock, epoch):
    """The log line of an epoch: losses, val AP50 (and its share of the ceiling, each class's), LR, seconds,
    elapsed and ETA, and on a GPU the epoch's peak memory."""
    per_class = [row.get(f"val_ap50_class{k}") for k in range(1, NUM_CLASSES + 1)]
    return (f"epoch {epoch}: train loss {row.get('train_loss', float('nan')):.4f}  val loss {row['val_loss']:.4f}  "
            f"val AP50 {row['val_ap50']:.4f}"
            + (f" ({row['val_ap50'] / limit['ap50']:.0%} of the ceiling)" if limit and limit["ap50"] > 0 else "")
            + (" [class " + " ".join("-" if v is None or v != v else f"{v:.2f}" for v in per_class) + "]"
               if any(v is not None for v in per_class) else "")
            + f"  AP {row['val_ap']:.4f}  lr {row['lr']:.2e}  {row['epoch_seconds']:.0f}s, {clock.eta(epoch)}"
            + (f"  GPU peak {row['gpu_peak_allocated_gb']:.1f}/{row['gpu_peak_reserved_gb']:.1f} GB (allocated/"
               "reserved)" if "gpu_peak_allocated_gb" in row else "")
            + (f"  skipped {row['skipped_steps']} non-finite, {row['oom_steps']} out-of-memory step(s)"
               if row["skipped_steps"] or row["oom_steps"] else "")
            + ("  (best)" if improved else ""))


def step_schedule(cfg, run, ap50, log):
    """ReduceLROnPlateau (SCHEDULE plateau; cosine sets the LR step by step) and early stopping on the epoch's
    val AP50 (every process steps the same schedule). Returns True where these weights are the best so far."""
    state = run.state
    improved, state["best_ap50"] = engine.best_so_far(ap50, state["best_ap50"])
    if cfg["SCHEDULE"] == "plateau":
        run.scheduler.step(ap50 if not math.isnan(ap50) else -math.inf)
    if improved:
        state["bad_epochs"] = 0
    else:
        state["bad_epochs"] += 1
        if state["bad_epochs"] >= cfg["EARLY_STOP_PATIENCE"]:
            state["stopped_early"] = True
            log(f"early stop: no better val AP50 for {state['bad_epochs']} epochs")
    return improved


def save_epoch(cfg, run, data, streams, improved):
    """last.pt (and best.pt where improved), metrics.csv and learning_curve.png, each written atomically.
    The checkpoint holds everything a resume needs: weights (and their average), optimiser, schedule,
    scaler, progress, configuration, split and every process's random streams."""
    run_dir = Path(cfg["RUN_DIR"])
    ckpt = {"model": run.model_without_ddp.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "state": run.state,
            "config": cfg, "epoch": run.state["epoch"], "train_ids": data.train_ids, "val_ids": data.val_ids,
            "rng_ranks": streams, "format": CHECKPOINT_FORMAT}
    if run.ema:  # infer.py predicts with these (model.load_weights(averaged=True))
        ckpt["ema"] = run.ema.state_dict()
    if improved:
        save_checkpoint(ckpt, run_dir / "best.pt")
    save_checkpoint(ckpt, run_dir / "last.pt")
    write_csv(run_dir / "metrics.csv", run.state["history"], METRIC_FIELDS)
    plot_curves(run.state["history"], run_dir / "learning_curve.png")


def plot_curves(history, path):
    """Learning curve: train/val loss (left axis), val AP50 and each class's (right axis) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [h.get("train_loss", math.nan) for h in history], "o-", label="train loss")  # none: no step ran
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_ap50"] for h in history], "^-", color="tab:green", label="val AP50")
    for k, colour in zip(range(1, NUM_CLASSES + 1), ("tab:red", "tab:purple", "tab:brown", "tab:gray")):
        ap = [h.get(f"val_ap50_class{k}", math.nan) for h in history]  # thin and dashed; NaN: no cell of it
        if any(v == v for v in ap):
            ax2.plot(epochs, ap, "--", linewidth=0.9, color=colour, label=f"val AP50 class {k}")
    ax2.set_ylabel("val AP50 (segm, maxDets 100)")
    ax2.set_ylim(0, 1)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------
# what stops a run with 'error: <message>' instead of a traceback
ERRORS = (DataError, PretrainedWeightsError, FloatingPointError, CheckpointError, ddp.PeerFailure,
          engine.OutOfMemoryStop, PredictionMemoryError, OSError)


def main(argv=None):
    start = time.time()  # RUN_MINUTES counts from here
    cfg, ckpt = resolve_config(argv)  # ckpt: the run's last.pt when resuming
    rank, world, device = ddp.setup_distributed(cfg)
    try:
        if ddp.distributed():  # a default runs/<time> may differ by a second between processes: take rank 0's
            cfg["RUN_DIR"] = ddp.broadcast_from_rank0(cfg["RUN_DIR"])
            start = ddp.broadcast_from_rank0(start)  # one RUN_MINUTES deadline for all
        log_file = Path(cfg["RUN_DIR"]) / "train.log"
        if (log_file.parent / "last.pt").exists() and not cfg["RESUME"]:
            raise SystemExit(f"{log_file.parent} already holds a run (last.pt); continue it with --resume, "
                             "or choose another --run-dir")
        with tee_output(log_file) if rank == 0 else nullcontext():  # rank 0 prints the run's lines
            try:
                return train(cfg, ckpt, rank, world, device, start)
            except BaseException as e:  # the reason a run stopped stays in its log (the console shows it anyway)
                if rank == 0:
                    with open(log_file, "a", encoding="utf-8") as f:
                        f.write(f"error: {type(e).__name__}: {e}\n" if isinstance(e, ERRORS + (SystemExit,))
                                else traceback.format_exc())
                raise
    finally:
        ddp.leave()


def make_demo(cfg):
    if not (Path(cfg["DATA_DIR"]) / "train").is_dir():
        print(f"making the synthetic demo dataset in {cfg['DATA_DIR']}")
        make_demo_data(cfg["DATA_DIR"], seed=cfg["SEED"])


def train(cfg, ckpt, rank, world, device, start=None):
    """The run, in this process: data, model, the fit loop; a demo run then predicts its test images.
    start: time.time() when the process started (RUN_MINUTES counts from it; None: now)."""
    start = time.time() if start is None else start
    log = print if rank == 0 else (lambda *a, **k: None)
    run_dir = Path(cfg["RUN_DIR"])
    if cfg["DEMO"]:  # rank 0 makes it; the others wait for it (or its error)
        ddp.on_rank0("making the demo data", lambda: make_demo(cfg))
    seed_everything(cfg["SEED"] + rank)  # the same initial weights are broadcast from rank 0 by DDP
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg["CUDNN_BENCHMARK"]
    data = setup_data(cfg, ckpt, rank, world, device, log)
    run = setup_training(cfg, ckpt, rank, world, device, data.generator, log)
    del ckpt
    if rank == 0:
        write_run_files(cfg, run, data)
    log_start(cfg, run, data, device, world, log)
    select = fit(cfg, run, data, device, log, start)
    if ddp.distributed():
        digest = ddp.check_ranks_in_sync(run.model_without_ddp)
        log(f"DDP: the {world} processes hold identical weights (parameters sha256 {digest[:16]})")
    log(f"done after {run.state['epoch']} epochs: " + (f"best val AP50 {run.state['best_ap50']:.4f}" if select else
        "best.pt = the latest weights") + f"; {run_dir}/best.pt")
    if cfg["DEMO"] and rank == 0:
        infer.main(["--checkpoint", str(run_dir / "best.pt"), "--output-json", str(run_dir / "test-results.json"),
                    "--num-workers", "0", "--detections-per-image", str(cfg["VAL_DETECTIONS_PER_IMAGE"])])
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except ERRORS as e:
        raise SystemExit(f"error: {e}") from None
