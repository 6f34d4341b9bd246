"""Ablation: the report's tables in one command. Trains every combination of the varied constants on the
same data, split and budget, through train.py's own code, each in its own run folder under --out, with one
or more seeds, and scores every run on the same held-out test images (DATA_DIR/test_gt_coco.json, as
`python -m bench.realistic_data` writes it).

    python -m bench.ablate --data-dir data/realistic --out runs/vs-peer --seeds 3 --peer --minutes 6 \\
        --vary scale=0,1 -- --backbone resnet18 --pretrained false --min-size 512 --max-size 512 --epochs 30
    python -m bench.ablate ... --vary mask-threshold=0.5,0.6,0.7 -- ...          # inference only: no retraining
    python -m bench.ablate ... --vary 'loss-weights=[{"loss_box_ciou": 1}, {"loss_box_ciou": 5}]' -- ...

--vary NAME=v1,v2 (repeatable; a JSON list for values that hold commas) takes any train.py constant but those
of its "run" section, or one of infer.py's prediction constants (SCORE_THRESHOLD, NMS_THRESHOLD, ...: these
reuse the trained checkpoint). Everything after `--` goes to every train.py run.
--each trains the levers one at a time against the shared configuration (a 'base' row, then one row per
value: `--each --vary heads=cascade --vary ema=0.999`) instead of every combination; an inference value is then
one more row on the base's checkpoints, and --ensemble fuses the base's seeds only. --together (with --each) adds
one row with all the varied training values at once (one value each): each lever alone, then all of them.
--seeds N trains every row with N seeds (SEED, SEED+1, ...: initialisation, data order and augmentation vary,
the val split, SPLIT_SEED, stays) and reports mean +- sd of each score.
--ensemble (with --seeds >= 2) adds a row per configuration (with --each: for the base): each seed's best.pt fused
with the next seed's (infer.py --checkpoint a,b: detections fused as TTA's), its steps and seconds the two runs' sums.
--peer adds torchvision's stock Mask R-CNN (bench/peer.py), tuned as a user would: each optimiser setting of
peer.GRID (or --peer-grid: optimiser, LR and, optionally, the schedule: the references' multistep or cosine over
the budget, as ours with --schedule cosine) trains with the first seed and the same budget, the best val AP50 picks one (the test images
are never looked at for it), and that setting trains with every seed: the "peer (tuned)" row, and the ratio
of each row's test AP50 to it, seed by seed. Both sides are scored from best.pt, the epoch of their best val AP50
(the latest weights where val picks nothing: fewer than MIN_VAL_IMAGES val images).

Scores (segm, pycocotools): AP50 at maxDets 100 (the leaderboard's) and its share of the ceiling that maxDets
leaves (evaluate.ceiling), AP50 at maxDets 1000, AP@[.5:.95], per-class AP50, training steps and seconds.
Runs go one at a time, so machine load hits ours and the peer alike; --minutes gives each the same training
wall-clock. Writes ablation.csv (a row per run), ablation.md (the README-ready table: mean +- sd over seeds)
and ablation.png (every run's val AP50 per epoch). Resumable: a scored run is skipped, an interrupted one
continues (train.py --resume), a trained one is only scored.
"""
import argparse
import csv
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import matplotlib
import torch

import evaluate
import infer
import train
from bench import peer
from dataset import DataError, TestDataset
from model import PretrainedWeightsError
from predict import load_ensemble, predict_dataset, to_records
from utils import (CheckpointError, parse_bool, atomic_write, load_checkpoint, pick_device, save_figure, save_json,
                   write_csv)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SCORING = 3  # what a cached score-*.json means; 2: detection budget per class, cascade sampled as detectron2;
#               3: the peer picked and scored by its best.pt
SCORE_FIELDS = ["ap50", "ap50_share", "ap50_maxdets1000", "ap", "ap50_class1", "ap50_class2", "ap50_class3",
                "ap50_class4", "steps", "train_seconds", "epochs"]
TABLE_FIELDS = [("AP50", "ap50"), ("of ceiling", "ap50_share"), ("AP50 (1000 dets)", "ap50_maxdets1000"),
                ("AP@[.5:.95]", "ap"), ("steps", "steps"), ("train s", "train_seconds")]


def constants():
    """{NAME: default} of the constants --vary takes: train.py's (but its "run" section, which bench/ablate.py sets
    itself) and infer.py's prediction constants (no retraining)."""
    training = {name: getattr(train, name) for name, section, _ in train.CONFIG if section.split()[0] != "run"}
    inference = {name: getattr(infer, name) for name in infer.PREDICTION}
    return training, inference


def parse_vary(items):
    """['losses=a,b', ...] -> [(NAME, [values as given])]; an unknown name stops with the list of constants."""
    training, inference = constants()
    varied = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--vary {item!r}: expected NAME=v1,v2,...")
        flag, text = item.split("=", 1)
        name = flag.strip().lstrip("-").replace("-", "_").upper()
        if name not in training and name not in inference:
            raise SystemExit(f"--vary {flag!r}: not a constant bench/ablate.py can vary.\n  training (train.py): "
                             + ", ".join(k.lower().replace("_", "-") for k in training)
                             + "\n  inference only (reuse the checkpoint): "
                             + ", ".join(k.lower().replace("_", "-") for k in inference))
        text = text.strip()
        if text.startswith("["):
            try:
                values = [v if isinstance(v, str) else json.dumps(v) for v in json.loads(text)]
            except json.JSONDecodeError as e:
                raise SystemExit(f"--vary {flag}: {text!r} is not a JSON list ({e})") from None
        else:
            values = [v.strip() for v in text.split(",") if v.strip()]
        if not values or any(name == n for n, _ in varied):
            raise SystemExit(f"--vary {flag}: give each constant once, with at least one value")
        varied.append((name, values))
    return varied


def typed(name, text, default):
    """A --vary value as infer.py would parse it (the type of the constant's default)."""
    if isinstance(default, bool):
        return parse_bool(text)
    if isinstance(default, (list, dict)):
        return json.loads(text)
    return type(default)(text) if isinstance(default, (int, float)) else text


def run_name(assignment):
    if not assignment:
        return "base"
    text = ",".join(f"{k.lower().replace('_', '-')}={v}" for k, v in assignment)
    return re.sub(r"[^A-Za-z0-9=.,_+-]+", "_", text)[:120]


def flags(assignment):
    return [a for k, v in assignment for a in ("--" + k.lower().replace("_", "-"), str(v))]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def score(records, coco_gt, state):
    """A run's test scores from its records and its last training state (steps, seconds, epochs)."""
    m100 = evaluate.coco_evaluate(coco_gt, records, max_dets=100)
    m1000 = evaluate.coco_evaluate(coco_gt, records, max_dets=1000)
    row = {"ap50": m100["ap50"], "ap50_share": m100["ap50"] / evaluate.ceiling(coco_gt)["ap50"],
           "ap50_maxdets1000": m1000["ap50"], "ap": m100["ap"], "steps": state["step"],
           "train_seconds": round(state.get("train_seconds", float("nan")), 1), "epochs": state["epoch"]}
    row.update({f"ap50_class{k}": v for k, v in m100["per_class_ap50"].items()})
    return row


def score_ours(run_dirs, data_dir, inference, device, coco_gt):
    """Our checkpoint (best.pt), or the ensemble of several runs' (detections fused, as infer.py --checkpoint
    a,b), on the test images with infer.py's prediction constants but those given. An ensemble's steps and
    seconds are its runs' sums: what it cost to train."""
    settings = infer.prediction_settings(**inference)
    models, opts, _ = load_ensemble([Path(d) / "best.pt" for d in run_dirs], device, settings)
    raw = predict_dataset(models, TestDataset(data_dir), device, opts, desc="test")
    states = [load_checkpoint(Path(d) / "last.pt")["state"] for d in run_dirs]
    state = {"step": sum(st["step"] for st in states), "epoch": max(st["epoch"] for st in states),
             "train_seconds": sum(st.get("train_seconds", float("nan")) for st in states)}
    return score(to_records(raw, settings["MASK_THRESHOLD"]), coco_gt, state)


def mean_sd(values):
    """(mean, sample standard deviation) of the finite values; sd 0 for one value, NaN for none."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def aggregate(rows, peer_label="peer (tuned)"):
    """The runs grouped by label (seeds of one configuration): {label: {field: (mean, sd)}, ...} in order of
    first appearance, with 'seeds' and, where the tuned peer is in the rows, 'vs_peer': each seed's AP50 over
    the peer's AP50 of the same seed, as (mean, sd)."""
    groups = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    peer = {r["seed"]: r["ap50"] for r in groups.get(peer_label, [])}
    out = {}
    for label, runs in groups.items():
        agg = {f: mean_sd([r[f] for r in runs]) for f in SCORE_FIELDS}
        agg["seeds"] = len(runs)
        ratios = [r["ap50"] / peer[r["seed"]] for r in runs if peer.get(r["seed"])]
        agg["vs_peer"] = mean_sd(ratios) if ratios else (float("nan"), float("nan"))
        out[label] = agg
    return out


def val_curve(run_dir):
    """[(epoch, val AP50)] from a run folder's metrics.csv."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return [(int(r["epoch"]), float(r["val_ap50"])) for r in rows if r.get("val_ap50") not in (None, "")]


def fmt(value, sd=None, digits=3):
    if isinstance(value, float) and math.isnan(value):
        return "-"
    text = f"{value:.{digits}f}"
    return text + (f" ± {sd:.{digits}f}" if sd is not None and not math.isnan(sd) else "")


def markdown(rows, varied_names, header, grid):
    """The README-ready table: one line per configuration, mean ± sd over its seeds; then the peer's grid."""
    agg = aggregate(rows)
    cols = ["run", *[n.lower() for n in varied_names], "seeds", *[name for name, _ in TABLE_FIELDS],
            "AP50 class 1 / 2 / 3 / 4", "× tuned peer"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    first = {}
    for r in rows:
        first.setdefault(r["label"], r)
    for label, a in agg.items():
        digits = {"steps": 0, "train_seconds": 0}
        cells = [label, *[str(first[label].get(n.lower(), "")) for n in varied_names], str(a["seeds"])]
        cells += [fmt(*a[f], digits=digits.get(f, 3)) for _, f in TABLE_FIELDS]
        cells.append(" / ".join(fmt(a[f"ap50_class{k}"][0]) for k in range(1, 5)))
        cells.append(fmt(*a["vs_peer"], digits=2) if not math.isnan(a["vs_peer"][0]) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if grid:
        lines += ["", "The peer's optimiser grid (first seed, same budget), chosen on val AP50 (its best epoch's):", "",
                  "| optimiser | lr | schedule | val AP50 | steps | train s | |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for g in grid:
            lines.append(f"| {g['optimizer']} | {g['lr']:g} | {g['schedule']} | {fmt(g['val_ap50'])} | {g['steps']} | "
                         f"{g['train_seconds']:.0f} | {'chosen' if g['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def write_outputs(out, rows, varied_names, header, grid=()):
    write_csv(out / "ablation.csv", rows, ["label", "seed", *[n.lower() for n in varied_names], *SCORE_FIELDS, "run_dir"])
    with atomic_write(out / "ablation.md", "w") as f:
        f.write(markdown(rows, varied_names, header, grid))
    fig, ax = plt.subplots(figsize=(7, 4))
    for run_dir in dict.fromkeys(r["run_dir"] for r in rows):
        curve = val_curve(run_dir)
        if curve:
            ax.plot(*zip(*curve), "o-", label=Path(run_dir).name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val AP50 (segm, maxDets 100)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, out / "ablation.png")
    plt.close(fig)


def parse_args(argv):
    """(bench/ablate.py's own arguments, the train.py arguments after `--`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="dataset in the HW3 layout with test_gt_coco.json")
    ap.add_argument("--out", required=True, help="folder of the run folders and the tables")
    ap.add_argument("--vary", action="append", default=[], metavar="NAME=v1,v2", help="repeatable")
    ap.add_argument("--each", action="store_true", help="one constant at a time against the shared configuration "
                    "(the 'base' row), instead of every combination; a prediction constant on the base's checkpoints")
    ap.add_argument("--together", action="store_true", help="with --each: also a row with every varied training "
                    "constant at once (one value each)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per row (SEED, SEED+1, ...; the split stays)")
    ap.add_argument("--ensemble", action="store_true", help="with --seeds >= 2: also each seed's checkpoint fused "
                    "with the next seed's (a two-checkpoint ensemble; its cost: both runs)")
    ap.add_argument("--peer", action="store_true", help="add torchvision's stock Mask R-CNN (bench/peer.py), its "
                    "optimiser chosen on val from peer.GRID")
    ap.add_argument("--peer-grid", default="", metavar="OPT:LR[:SCHEDULE],...",
                    help="the peer's optimiser settings to try, e.g. adamw:1e-4,adamw:2e-4:cosine,sgd:0.01 (schedule: "
                         "multistep, the references', or cosine over the budget; default: peer.GRID)")
    ap.add_argument("--peer-backbone", default="", help="the peer's torchvision ResNet (default: ours' BACKBONE)")
    ap.add_argument("--minutes", type=float, default=0.0, help="training minutes per run (MAX_MINUTES)")
    args = ap.parse_args(own)
    args.peer_grid = parse_peer_grid(args.peer_grid) if args.peer_grid else list(peer.GRID)
    if args.ensemble and args.seeds < 2:
        raise SystemExit("--ensemble fuses the checkpoints of two seeds: give --seeds 2 or more")
    if args.seeds < 1:
        raise SystemExit("--seeds: at least 1")
    if args.together and not args.each:
        raise SystemExit("--together adds the levers' combined row to --each's table: give --each (without it, "
                         "every combination is trained already)")
    args.own = own
    return args, shared


def grids(varied, training, inference, each, together=False):
    """[(training assignment, its inference assignments)]: every combination, or with `each` the base and each
    value alone: a training value scored with infer.py's defaults, an inference value on the base's checkpoint;
    `together` then adds the training values all at once."""
    if together and not each:
        raise SystemExit("--together adds a row to --each's: give --each too")
    train_axes = [(n, v) for n, v in varied if n in training]
    infer_axes = [(n, v) for n, v in varied if n in inference]
    if together and (len(train_axes) < 2 or any(len(vs) != 1 for _, vs in train_axes)):
        given = "; ".join(f"{n.lower().replace('_', '-')}={','.join(vs)}" for n, vs in train_axes) or "none"
        raise SystemExit(f"--together combines the varied training constants: give two or more, one value each "
                         f"(given: {given})")
    if each:
        return [((), [()] + [((n, v),) for n, vs in infer_axes for v in vs])] + \
            [(((n, v),), [()]) for n, vs in train_axes for v in vs] + \
            ([(tuple((n, vs[0]) for n, vs in train_axes), [()])] if together else [])
    infer_grid = list(itertools.product(*[[(n, v) for v in vs] for n, vs in infer_axes]))
    return [(a, infer_grid) for a in itertools.product(*[[(n, v) for v in vs] for n, vs in train_axes])]


def check_settings(out, settings):
    """A rerun continues the same grid: its runs must share one setting (else scores would be reused wrongly)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ablate.json").is_file():
        before = json.loads((out / "ablate.json").read_text())
        before.setdefault("roi_batch_size", 512)  # a folder from before ROI_BATCH_SIZE auto: torchvision's 512 then
        if before != settings:
            raise SystemExit(f"{out} holds runs made with other settings ({before}); their scores would be reused "
                             f"under the new ones ({settings}): use another --out, or the same flags")
    else:
        save_json(settings, out / "ablate.json")


def run_ours(out, base, assignment, seed, seeds, infer_grid, inference, data_dir, device, coco_gt, where):
    """One configuration with one seed: trained (or continued) unless every score is there, then scored with
    each inference assignment. Returns its rows."""
    name = run_name(assignment)
    label, seed_flags = name, []
    if len(seeds) > 1:
        name, seed_flags = f"{name},seed={seed}", ["--seed", str(seed)]
    run_dir = out / name
    pending = [inf for inf in infer_grid if not (run_dir / f"score-{run_name(inf)}.json").is_file()]
    state = "scored" if not pending else ("continuing" if (run_dir / "last.pt").exists() else "training")
    print(f"[ablate] {where}: {name} ({state})", flush=True)
    if pending:
        resume = ["--resume"] if (run_dir / "last.pt").exists() else []
        train.main(base + ["--run-dir", str(run_dir)] + flags(assignment) + seed_flags + resume)
    return scored_rows([run_dir], label, seed, assignment, infer_grid, inference, data_dir, device, coco_gt,
                       "score", f"{where}: {name}")


def scored_rows(run_dirs, label, seed, assignment, infer_grid, inference, data_dir, device, coco_gt, prefix, where):
    """A row per inference assignment for the checkpoints of run_dirs (one run, or an ensemble), each score
    cached as <first run>/<prefix>-<inference>.json."""
    rows = []
    for inf in infer_grid:
        path = Path(run_dirs[0]) / f"{prefix}-{run_name(inf)}.json"
        if not path.is_file():
            print(f"[ablate] {where}: scoring {run_name(inf)} on the test images", flush=True)
            save_json(score_ours(run_dirs, data_dir, {n: typed(n, v, inference[n]) for n, v in inf}, device, coco_gt),
                      path)
        rows.append({"label": label if not inf else f"{label} / {run_name(inf)}", "seed": seed,
                     "run_dir": str(run_dirs[0]), **{n.lower(): v for n, v in assignment},
                     **{n.lower(): v for n, v in inf}, **json.loads(path.read_text())})
    return rows


def parse_peer_grid(text):
    """'adamw:1e-4,sgd:0.01:cosine' -> [("adamw", 1e-4, "multistep"), ("sgd", 0.01, "cosine")]; a bad entry
    stops with the form expected."""
    grid = []
    for item in text.split(","):
        parts = [p.strip().lower() for p in item.split(":")]
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            grid.append((parts[0], float(parts[1]), parts[2] if len(parts) == 3 else peer.SCHEDULES[0]))
        except ValueError:
            raise SystemExit(f"--peer-grid {item!r}: expected OPTIMIZER:LR[:SCHEDULE], e.g. adamw:2e-4") from None
        if grid[-1][0] not in peer.OPTIMIZERS or grid[-1][1] <= 0 or grid[-1][2] not in peer.SCHEDULES:
            raise SystemExit(f"--peer-grid {item!r}: optimizer one of {', '.join(peer.OPTIMIZERS)}, lr > 0, "
                             f"schedule (optional) one of {', '.join(peer.SCHEDULES)}")
    return grid


def run_ensembles(assignment, runs, infer_grid, inference, data_dir, device, coco_gt):
    """--ensemble: the runs [(run folder, seed)] of one configuration; seed i's best.pt fused with seed i+1's
    (the last with the first; with two seeds the one pair), scored as one more row per pair ('<label> + next
    seed')."""
    out = []
    for i, (run_dir, seed) in enumerate(runs[:1] if len(runs) == 2 else runs):
        partner = runs[(i + 1) % len(runs)][0]
        out += scored_rows([run_dir, partner], f"{run_name(assignment)} + next seed", seed, assignment, infer_grid,
                           inference, data_dir, device, coco_gt, "score-ensemble", f"ensemble {run_dir} + {partner}")
    return out


def run_peer(out, cfg, args, seeds, data_dir, device, coco_gt):
    """The tuned peer: peer.GRID with the first seed, the setting of the best val AP50 (its best.pt's, as ours
    is picked) chosen, then that setting with every seed, its best.pt scored on the test images. Returns (rows,
    grid summary)."""
    if cfg["PRETRAINED"] and not cfg["PRETRAINED_WEIGHTS"]:
        raise SystemExit("--peer never downloads: with pretrained weights, give them as a local file "
                         "(--pretrained-weights FILE after --), or train both from scratch")

    def trained(optimizer, lr, schedule, seed):
        name = f"{optimizer}-{lr:g}" + ("" if schedule == peer.SCHEDULES[0] else f"-{schedule}")
        run_dir = out / "peer" / (name + (f",seed={seed}" if seed != seeds[0] else ""))
        print(f"[ablate] peer {optimizer} lr {lr:g} ({schedule}), seed {seed}", flush=True)
        best = peer.train_peer(data_dir, run_dir, args.peer_backbone or cfg["BACKBONE"], cfg["EPOCHS"], args.minutes,
                               cfg["MIN_SIZE"], cfg["MAX_SIZE"], cfg["VAL_FRACTION"], seed, cfg["PRETRAINED_WEIGHTS"],
                               str(device), optimizer=optimizer, lr=lr, split_seed=cfg["SPLIT_SEED"],
                               min_val_images=cfg["MIN_VAL_IMAGES"], schedule=schedule)
        return best, load_checkpoint(run_dir / "last.pt")["state"]  # the whole run's steps and seconds

    grid = []
    for optimizer, lr, schedule in args.peer_grid:
        _, state = trained(optimizer, lr, schedule, seeds[0])
        picked = state["best_ap50"]  # best.pt's val AP50; -inf where val picked nothing
        grid.append({"optimizer": optimizer, "lr": lr, "schedule": schedule, "val_ap50": picked if picked > -math.inf else float("nan"),
                     "steps": state["step"], "train_seconds": state["train_seconds"], "chosen": False})
    best = max(grid, key=lambda g: -math.inf if math.isnan(g["val_ap50"]) else g["val_ap50"])
    best["chosen"] = True
    rows = []
    for seed in seeds:
        checkpoint, state = trained(best["optimizer"], best["lr"], best["schedule"], seed)
        path = checkpoint.parent / "score.json"
        if not path.is_file():
            save_json(score(peer.test_records(checkpoint, data_dir, str(device)), coco_gt, state), path)
        rows.append({"label": "peer (tuned)", "seed": seed, "run_dir": str(checkpoint.parent),
                     **json.loads(path.read_text())})
    return rows, grid


def main(argv=None):
    args, shared = parse_args(argv)
    varied = parse_vary(args.vary)
    training, inference = constants()
    out, data_dir = Path(args.out), Path(args.data_dir)
    base = shared + ["--data-dir", str(data_dir)] + (["--max-minutes", str(args.minutes)] if args.minutes else [])
    cfg, _ = train.resolve_config(base + ["--run-dir", str(out / "_")])  # the shared configuration
    coco_gt = evaluate.test_ground_truth(data_dir)
    device = pick_device(cfg["DEVICE"])
    seeds = [cfg["SEED"] + i for i in range(args.seeds)]
    grid_rows = grids(varied, training, inference, args.each, args.together)
    if args.each and cfg["HEADS"] != "cascade" and "CASCADE_SCORE_STAGES" in dict(varied):
        raise SystemExit("--each scores prediction constants on the base, whose HEADS is not cascade: "
                         "CASCADE_SCORE_STAGES would change nothing; vary it without --each and with --heads cascade")
    check_settings(out, {"data_dir": str(data_dir), "minutes": args.minutes, "shared": shared, "seeds": args.seeds,
                         "scoring": SCORING, "scale": cfg["SCALE"],  # the base's SCALE and RoIs as resolved
                         "roi_batch_size": cfg["ROI_BATCH_SIZE"]})  # (auto: by start; an old --out cannot mix them)
    t_start, rows, grid = time.time(), [], []
    names = [n for n, _ in varied]
    for i, (assignment, infer_grid) in enumerate(grid_rows, start=1):
        runs = []
        for seed in seeds:
            new = run_ours(out, base, assignment, seed, seeds, infer_grid, inference, data_dir, device, coco_gt,
                           f"run {i}/{len(grid_rows)}, seed {seed}")
            rows += new
            runs.append((new[0]["run_dir"], seed))
            write_outputs(out, rows, names, "")
        if args.ensemble and len(seeds) > 1 and not (args.each and assignment):  # --each: a lever on the base
            rows += run_ensembles(assignment, runs, infer_grid[:1] if args.each else infer_grid, inference,
                                  data_dir, device, coco_gt)
            write_outputs(out, rows, names, "")
    if args.peer:
        peer_rows, grid = run_peer(out, cfg, args, seeds, data_dir, device, coco_gt)
        rows += peer_rows
    budget = f"{cfg['EPOCHS']} epochs" + (f" or {args.minutes:g} min of training per run" if args.minutes else "")
    header = (f"`python -m bench.ablate {' '.join(args.own)} -- {' '.join(shared)}` on {data_dir} "
              f"({len(list((data_dir / 'train').iterdir()))} training images incl. val, "
              f"{len(coco_gt.getImgIds())} test images; {evaluate.format_ceiling(evaluate.ceiling(coco_gt))}); "
              f"seeds {', '.join(map(str, seeds))}; budget {budget}; runs one at a time on {device_name(device)}; "
              f"this invocation {time.time() - t_start:.0f} s")
    write_outputs(out, rows, names, header, grid)
    print((out / "ablation.md").read_text())
    return rows


if __name__ == "__main__":
    try:
        main()
    except (DataError, PretrainedWeightsError, FloatingPointError, CheckpointError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
