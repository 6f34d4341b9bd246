"""Ablation: the report's tables in one command. Trains every combination of the varied constants on the
same data, split, seed and budget, through train.py's own code, each in its own run folder under --out,
and scores every run on the same held-out test images (DATA_DIR/test_gt_coco.json, as
bench/realistic_data.py writes it).

    python ablate.py --data-dir data/realistic --out runs/ablation-real \\
        --vary losses=stock,ciou_dice_boundary,report --peer --minutes 6 \\
        -- --backbone resnet18 --pretrained false --min-size 512 --max-size 683 --epochs 30
    python ablate.py ... --vary mask-threshold=0.5,0.6,0.7 -- ...          # inference only: no retraining
    python ablate.py ... --vary 'loss-weights=[{"loss_box_ciou": 1}, {"loss_box_ciou": 5}]' -- ...

--vary NAME=v1,v2 (repeatable; a JSON list for values that hold commas) takes any train.py constant but those
of its "run" section, or one of infer.py's prediction constants (SCORE_THRESHOLD, NMS_THRESHOLD, ...: these
reuse the trained checkpoint). Everything after `--` goes to every train.py run.
--each trains the levers one at a time against the shared configuration (a 'base' row, then one row per
value: `--each --vary heads=cascade --vary ema=0.999`) instead of every combination.
--peer adds torchvision's stock Mask R-CNN (peer.py) on the same data, split, input size and budget.

Scores (segm, pycocotools): AP50 at maxDets 100 (the leaderboard's), AP50 at maxDets 1000, AP@[.5:.95],
per-class AP50, training seconds. Writes ablation.csv, ablation.md (a README-ready table) and ablation.png
(every run's val AP50 per epoch). Resumable: a scored run is skipped, an interrupted one continues
(train.py --resume), a trained one is only scored.
"""
import argparse
import csv
import io
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
import peer
import train
from dataset import DataError, TestDataset
from model import PretrainedWeightsError
from predict import load_model, predict_dataset, predict_options, to_records
from utils import CheckpointError, _parse_bool, atomic_write, load_checkpoint, pick_device, save_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SCORE_FIELDS = ["ap50", "ap50_maxdets1000", "ap", "ap50_class1", "ap50_class2", "ap50_class3", "ap50_class4",
                "train_seconds", "epochs"]


def constants():
    """{NAME: default} of the constants --vary takes: train.py's (but its "run" section, which ablate.py sets
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
            raise SystemExit(f"--vary {flag!r}: not a constant ablate.py can vary.\n  training (train.py): "
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
        return _parse_bool(text)
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


def score(records, coco_gt, train_seconds, epochs):
    m100 = evaluate.coco_evaluate(coco_gt, records, max_dets=100)
    m1000 = evaluate.coco_evaluate(coco_gt, records, max_dets=1000)
    row = {"ap50": m100["ap50"], "ap50_maxdets1000": m1000["ap50"], "ap": m100["ap"],
           "train_seconds": round(train_seconds, 1), "epochs": epochs}
    row.update({f"ap50_class{k}": v for k, v in m100["per_class_ap50"].items()})
    return row


def score_ours(run_dir, data_dir, inference, device, coco_gt):
    """Our checkpoint (best.pt) on the test images, with infer.py's prediction constants but those given."""
    settings = infer.prediction_settings(**inference)
    model, ckpt = load_model(run_dir / "best.pt", device, settings)
    raw = predict_dataset(model, TestDataset(data_dir), device, predict_options(ckpt["config"], settings), desc="test")
    records = to_records(raw, settings["MASK_THRESHOLD"])
    state = load_checkpoint(run_dir / "last.pt")["state"]
    return score(records, coco_gt, state.get("train_seconds", float("nan")), state["epoch"])


def val_curve(run_dir):
    """[(epoch, val AP50)] from a run folder's metrics.csv."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return [(int(r["epoch"]), float(r["val_ap50"])) for r in rows if r.get("val_ap50") not in (None, "")]


def write_outputs(out, rows, varied_names, header):
    fields = ["run", *[n.lower() for n in varied_names], *SCORE_FIELDS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(out / "ablation.csv", "w") as f:
        f.write(buf.getvalue())
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else ("-" if isinstance(v, float) else str(v))  # noqa: E731
    cols = ["run", *[n.lower() for n in varied_names], "AP50", "AP50 (1000 dets)", "AP@[.5:.95]",
            "AP50 class 1 / 2 / 3 / 4", "train s", "epochs"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        per_class = " / ".join(fmt(r[f"ap50_class{k}"]) for k in range(1, 5))
        lines.append("| " + " | ".join([r["run"], *[str(r.get(n.lower(), "")) for n in varied_names],
                                         fmt(r["ap50"]), fmt(r["ap50_maxdets1000"]), fmt(r["ap"]), per_class,
                                         f"{r['train_seconds']:.0f}", str(r["epochs"])]) + " |")
    with atomic_write(out / "ablation.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for r in rows:
        if r["run_dir"] in seen:
            continue
        seen.add(r["run_dir"])
        curve = val_curve(r["run_dir"])
        if curve:
            ax.plot(*zip(*curve), "o-", label=Path(r["run_dir"]).name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val AP50 (segm, maxDets 100)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(out / "ablation.png", "wb") as f:
        f.write(png.getvalue())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="dataset in the HW3 layout with test_gt_coco.json")
    ap.add_argument("--out", required=True, help="folder of the run folders and the tables")
    ap.add_argument("--vary", action="append", default=[], metavar="NAME=v1,v2", help="repeatable")
    ap.add_argument("--each", action="store_true", help="one training constant at a time against the shared "
                    "configuration (the 'base' row), instead of every combination")
    ap.add_argument("--peer", action="store_true", help="add torchvision's stock Mask R-CNN (peer.py)")
    ap.add_argument("--peer-backbone", default="", help="the peer's torchvision ResNet (default: ours' BACKBONE)")
    ap.add_argument("--minutes", type=float, default=0.0, help="training minutes per run (MAX_MINUTES)")
    args = ap.parse_args(own)
    varied = parse_vary(args.vary)
    training, inference = constants()
    out, data_dir = Path(args.out), Path(args.data_dir)
    base = shared + ["--data-dir", str(data_dir)] + (["--max-minutes", str(args.minutes)] if args.minutes else [])
    cfg, _ = train.resolve_config(base + ["--run-dir", str(out / "_")])  # the shared configuration
    coco_gt = evaluate.test_ground_truth(data_dir)
    device = pick_device(cfg["DEVICE"])
    train_axes = [(n, v) for n, v in varied if n in training]
    infer_axes = [(n, v) for n, v in varied if n in inference]
    if args.each:  # the levers one by one: base, then each value of each varied constant alone
        train_grid = [()] + [((n, v),) for n, vs in train_axes for v in vs]
    else:
        train_grid = list(itertools.product(*[[(n, v) for v in vs] for n, vs in train_axes]))
    infer_grid = list(itertools.product(*[[(n, v) for v in vs] for n, vs in infer_axes]))
    total = len(train_grid) + bool(args.peer)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"data_dir": str(data_dir), "minutes": args.minutes, "shared": shared}
    if (out / "ablate.json").is_file():  # a rerun continues the same grid: its runs must share one setting
        before = json.loads((out / "ablate.json").read_text())
        if before != settings:
            raise SystemExit(f"{out} holds runs made with other settings ({before}); their scores would be reused "
                             f"under the new ones ({settings}): use another --out, or the same flags")
    else:
        save_json(settings, out / "ablate.json")
    t_start = time.time()
    rows = []
    for i, assignment in enumerate(train_grid, start=1):
        name = run_name(assignment)
        run_dir = out / name
        pending = [inf for inf in infer_grid if not (run_dir / f"score-{run_name(inf)}.json").is_file()]
        state = "scored" if not pending else ("continuing" if (run_dir / "last.pt").exists() else "training")
        print(f"[ablate] run {i}/{total}: {name} ({state})", flush=True)
        if pending:
            resume = ["--resume"] if (run_dir / "last.pt").exists() else []
            train.main(base + ["--run-dir", str(run_dir)] + flags(assignment) + resume)
        for inf in infer_grid:
            path = run_dir / f"score-{run_name(inf)}.json"
            if not path.is_file():
                values = {n: typed(n, v, inference[n]) for n, v in inf}
                print(f"[ablate] run {i}/{total}: {name}: scoring {run_name(inf)} on the test images", flush=True)
                save_json(score_ours(run_dir, data_dir, values, device, coco_gt), path)
            row = json.loads(path.read_text())
            rows.append({"run": name if not inf else f"{name} / {run_name(inf)}", "run_dir": str(run_dir),
                         **{n.lower(): v for n, v in assignment}, **{n.lower(): v for n, v in inf}, **row})
        write_outputs(out, rows, [n for n, _ in varied], "")
    if args.peer:
        run_dir = out / "peer"
        path = run_dir / "score.json"
        print(f"[ablate] run {total}/{total}: peer ({'scored' if path.is_file() else 'training'})", flush=True)
        if not path.is_file():
            if cfg["PRETRAINED"] and not cfg["PRETRAINED_WEIGHTS"]:
                raise SystemExit("--peer never downloads: with pretrained weights, give them as a local file "
                                 "(--pretrained-weights FILE after --), or train both from scratch")
            last = peer.train_peer(data_dir, run_dir, args.peer_backbone or cfg["BACKBONE"], cfg["EPOCHS"],
                                   args.minutes, cfg["MIN_SIZE"], cfg["MAX_SIZE"], cfg["VAL_FRACTION"], cfg["SEED"],
                                   cfg["PRETRAINED_WEIGHTS"], str(device))
            state = load_checkpoint(last)["state"]
            save_json(score(peer.test_records(last, data_dir, str(device)), coco_gt, state["train_seconds"],
                            state["epoch"]), path)
        rows.append({"run": "peer (torchvision stock)", "run_dir": str(run_dir), **json.loads(path.read_text())})
    budget = f"{cfg['EPOCHS']} epochs" + (f" or {args.minutes:g} min of training per run" if args.minutes else "")
    header = (f"`python ablate.py {' '.join(own)} -- {' '.join(shared)}` on {data_dir} "
              f"({len(list((data_dir / 'train').iterdir()))} training images incl. val, "
              f"{len(coco_gt.getImgIds())} test images); budget {budget}; device {device_name(device)}; "
              f"this invocation {time.time() - t_start:.0f} s")
    write_outputs(out, rows, [n for n, _ in varied], header)
    print((out / "ablation.md").read_text())
    return rows


if __name__ == "__main__":
    try:
        main()
    except (DataError, PretrainedWeightsError, FloatingPointError, CheckpointError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
