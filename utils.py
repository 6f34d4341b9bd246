"""Shared helpers: the config block of a script and its command-line overrides, seeding, atomic checkpoint
and JSON I/O, COCO RLE encoding and ground-truth dicts (the leaderboard's COCO evaluation is in evaluate.py).

Everything here is small glue around argparse, torch.save, pycocotools and json.
"""
import argparse
import ast
import contextlib
import csv
import io
import json
import os
import random
import sys
import tempfile
import tokenize
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

NUM_CLASSES = 4  # cell classes 1..4; the model adds background as class 0


# ----------------------------------------------------------------------------------------------
# configuration: UPPER_CASE constants at the top of a script, overridable as --lower-case VALUE
def parse_bool(text):
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_json(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON value, got {text!r} ({e})") from None


def _parse_float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


CONFIG_MARK = "# ---- config"  # "# ---- config: <section>" opens a section of constants ...
CONFIG_END = "# ---- end of config"  # ... and this line closes the block


def config_block(path):
    """The constants of a script's config block: [(NAME, section, help)] in order of definition.

    The block runs from the first "# ---- config: <section>" line to "# ---- end of config"; each such
    line opens a section. A constant's help is its trailing comment plus the indented comment lines
    that follow it, so the comment beside a constant is what `--help` shows. Names outside the block
    (helpers, tables) are not configuration."""
    source = Path(path).read_text()
    comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    lines = source.splitlines()
    sections, end = {}, None  # {line of a section's marker: its name}, the end marker's line
    for n, line in enumerate(lines, start=1):
        if line.startswith(CONFIG_MARK + ":"):
            sections[n] = line[len(CONFIG_MARK) + 1:].strip(" -")
        elif line.startswith(CONFIG_END):
            end = n
            break
    if not sections or end is None:
        raise ValueError(f"{path}: no config block ('{CONFIG_MARK}: <section>' ... '{CONFIG_END}')")
    out = []
    for node in ast.parse(source).body:
        if not min(sections) < node.lineno < end:
            continue
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.isupper()):
            raise ValueError(f"{path}:{node.lineno}: the config block holds only NAME = value lines (UPPER_CASE)")
        text = [c for n, (_, c) in comments.items() if node.lineno <= n <= node.end_lineno]
        n = node.end_lineno + 1
        while n in comments and comments[n][0] > 0 and lines[n - 1].lstrip().startswith("#"):
            text.append(comments[n][1])  # an indented comment line goes on with the constant's comment
            n += 1
        if not text:
            raise ValueError(f"{path}:{node.lineno}: {node.targets[0].id} has no comment to say what it means "
                             "(--help shows it)")
        section = sections[max(k for k in sections if k < node.lineno)]
        out.append((node.targets[0].id, section, " ".join(text)))
    return out


def apply_overrides(namespace, block, argv=None, description=None):
    """Override the constants of a config block (config_block's list) in `namespace` (a module's
    globals()) from the command line.

    `--epochs 3` sets EPOCHS = 3, with the type taken from the constant's default: booleans take
    true/false (a bare `--resume` means true), lists and dicts take JSON. `--help` lists them by
    section with each one's comment and default.
    Returns (config dict of the block's constants, set of names given on the command line).
    """
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for name, section, text in block:
        default = namespace[name]
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        flag = "--" + name.lower().replace("_", "-")
        shown = json.dumps(default) if isinstance(default, (list, dict)) else repr(default)
        common = dict(default=default, dest=name, help=f"{text} [default: {shown}]".replace("%", "%%").strip())
        if isinstance(default, bool):
            group.add_argument(flag, type=parse_bool, nargs="?", const=True, metavar="true|false", **common)
        elif isinstance(default, int):
            group.add_argument(flag, type=int, **common)
        elif isinstance(default, float):
            group.add_argument(flag, type=_parse_float, **common)
        elif isinstance(default, (list, dict)):
            group.add_argument(flag, type=_parse_json, metavar="JSON", **common)
        else:
            group.add_argument(flag, type=str, **common)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    names = [name for name, _, _ in block]
    given = {t[2:].split("=", 1)[0].replace("-", "_").upper() for t in argv if t.startswith("--")}
    return {name: getattr(args, name) for name in names}, given & set(names)


def pick_device(name):
    """DEVICE: 'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# reproducibility
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device=None):
    """This process's random state: Python, NumPy, torch's CPU generator and, where it trains on a
    GPU, that GPU's generator only (not every visible GPU's: a resume may see fewer)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device=None, cuda_seed=0):
    """Restore rng_state(device)'s output on `device`, whatever GPUs this machine has; a GPU whose state
    the checkpoint lacks is seeded with cuda_seed. Returns notes on what could not be restored (never
    raises for a change of machine)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if cuda is not None and not on_gpu:
        return [f"the checkpoint's CUDA random state is not restored: this run is on {device or 'the CPU'}"]
    if cuda is None and on_gpu:
        _seed_cuda(device, cuda_seed)
        return ["the checkpoint holds no CUDA random state (it was trained on the CPU): the CUDA stream "
                f"starts from seed {cuda_seed}"]
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    return []


def _seed_cuda(device, seed):
    with torch.cuda.device(device):
        torch.cuda.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# atomic writes: write a temporary file in the same folder, fsync, then rename over the target,
# so a crash or a full disk leaves the previous file whole.
@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


class Tee:
    """A text stream that writes to `stream` and appends to a log file: what a person reads on the console, less
    progress-bar redraws (writes holding a carriage return, and the line end that closes such a bar)."""

    def __init__(self, stream, log):
        self.stream, self.log, self.in_bar = stream, log, False

    def write(self, text):
        n = self.stream.write(text)
        if "\r" in text:
            self.in_bar = True
        elif not (self.in_bar and text.strip() == ""):
            self.in_bar = False
            self.log.write(text)
            self.log.flush()
        return n

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the console stream (tqdm asks)
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_output(path):
    """Everything printed to stdout and stderr inside the block also appended to the text file `path` (created
    with its folder; a resumed run's lines go after the earlier ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", errors="replace") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, log), Tee(err, log)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = out, err


def write_csv(path, rows, fields):
    """rows (dicts) as a CSV file with these columns (other keys ignored, missing ones empty), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def save_figure(fig, path):
    """A matplotlib figure as a PNG, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def save_json(obj, path):
    with atomic_write(path, "w") as f:
        json.dump(obj, f)


def save_checkpoint(obj, path):
    try:
        with atomic_write(path, "wb") as f:
            torch.save(obj, f)
    except OSError as e:
        raise OSError(f"could not write checkpoint {path}: {e.strerror or e} "
                      "(the previous file, if any, is unchanged)") from e


class CheckpointError(RuntimeError):
    pass


CHECKPOINT_FORMAT = 3  # train.py's checkpoint layout; load_checkpoint refuses others (earlier repo versions)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by train.py, with an error that names the file and the problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a torch checkpoint): {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"checkpoint {path} was not written by train.py (no 'model'/'config' entries)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} was written by an earlier version of this repo (checkpoint format "
                              f"{ckpt.get('format', 'before 3')}, this one reads {CHECKPOINT_FORMAT}): predict or "
                              "resume with the version that wrote it, or train anew")
    return ckpt


# ----------------------------------------------------------------------------------------------
# COCO RLE
def encode_mask(mask):
    """Binary HxW mask -> COCO compressed RLE {'size': [h, w], 'counts': str}."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_dict(images):
    """COCO ground truth as a dict from [{'id', 'height', 'width', 'masks' (N,H,W), 'labels' (N,)}]:
    one annotation per mask (RLE, area, bbox), categories 1..NUM_CLASSES."""
    out = {"images": [], "annotations": [],
           "categories": [{"id": k, "name": f"class{k}"} for k in range(1, NUM_CLASSES + 1)]}
    for im in images:
        out["images"].append({"id": int(im["id"]), "height": int(im["height"]), "width": int(im["width"])})
        for mask, label in zip(im["masks"], im["labels"]):
            rle = encode_mask(mask)
            out["annotations"].append({
                "id": len(out["annotations"]) + 1, "image_id": int(im["id"]), "category_id": int(label), "iscrowd": 0,
                "segmentation": rle, "area": float(mask_utils.area(bytes_rle(rle))),
                "bbox": [float(v) for v in mask_utils.toBbox(bytes_rle(rle))]})
    return out


def decode_mask(rle):
    """COCO RLE (counts as str or bytes) -> HxW uint8 mask."""
    return mask_utils.decode(bytes_rle(rle))


def bytes_rle(rle):
    """A COCO RLE with its counts as bytes, as pycocotools takes it (submissions and JSON hold str)."""
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]}
