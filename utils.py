"""Shared helpers: command-line overrides of constants, seeding, atomic checkpoint and JSON I/O,
COCO RLE encoding (the leaderboard's COCO evaluation is in evaluate.py).

Everything here is small glue around argparse, torch.save, pycocotools and json.
"""
import argparse
import contextlib
import json
import os
import random
import sys
import tempfile

import numpy as np
import torch
from pycocotools import mask as mask_utils

NUM_CLASSES = 4  # cell classes 1..4; the model adds background as class 0


# ----------------------------------------------------------------------------------------------
# configuration: UPPER_CASE constants at the top of a script, overridable as --lower-case VALUE
def _parse_bool(text):
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


def config_names(namespace):
    """The UPPER_CASE constants of a script's globals, in definition order."""
    return [k for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str, list, dict, type(None)))]


def apply_overrides(namespace, argv=None, description=None):
    """Override the UPPER_CASE constants in `namespace` (a module's globals()) from the command line.

    `--epochs 3` sets EPOCHS = 3, with the type taken from the constant's default: booleans take
    true/false (a bare `--resume` means true), lists and dicts take JSON, None takes a string.
    Returns (config dict of all constants, set of names given on the command line).
    """
    names = config_names(namespace)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in names:
        default = namespace[name]
        flag = "--" + name.lower().replace("_", "-")
        common = dict(default=default, dest=name, help="default: %(default)s")
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, metavar="true|false", **common)
        elif isinstance(default, int):
            parser.add_argument(flag, type=int, **common)
        elif isinstance(default, float):
            parser.add_argument(flag, type=_parse_float, **common)
        elif isinstance(default, (list, dict)):
            parser.add_argument(flag, type=_parse_json, metavar="JSON", **common)
        else:
            parser.add_argument(flag, type=str, **common)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    for name in names:
        namespace[name] = getattr(args, name)
    given = {t[2:].split("=", 1)[0].replace("-", "_").upper() for t in argv if t.startswith("--")}
    return {name: namespace[name] for name in names}, given


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
    if isinstance(cuda, (list, tuple)):  # older checkpoints: get_rng_state_all(), one per visible GPU
        index = (torch.device(device).index or 0) if on_gpu else 0
        if on_gpu and index >= len(cuda):
            _seed_cuda(device, cuda_seed)
            return [f"the checkpoint holds CUDA random states of {len(cuda)} GPU(s), none for {device}: "
                    f"its CUDA stream starts from seed {cuda_seed}"]
        cuda = cuda[index] if cuda else None
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
    return ckpt


# ----------------------------------------------------------------------------------------------
# COCO RLE
def encode_mask(mask):
    """Binary HxW mask -> COCO compressed RLE {'size': [h, w], 'counts': str}."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_mask(rle):
    """COCO RLE (counts as str or bytes) -> HxW uint8 mask."""
    return mask_utils.decode(_bytes_rle(rle))


def _bytes_rle(rle):
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]}
