"""DistributedDataParallel helpers (torchrun, one process a GPU; gloo on the CPU), in one place.

A plain `python train.py` is one process: every helper here then does nothing more than its plain
meaning (the value itself, fn() called, the process's own random streams).
"""
import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from utils import pick_device, rng_state, seed_everything, set_rng_state


def distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if distributed() else 0


def setup_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL, one GPU per process (LOCAL_RANK),
    or gloo on CPU. Returns (rank, world size, device); a plain `python train.py` gets (0, 1, DEVICE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(cfg["DEVICE"])
    local = int(os.environ["LOCAL_RANK"])
    if cfg["DEVICE"] != "cpu" and torch.cuda.is_available():
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    # rank 0 validates and saves while the others wait in the next collective: allow for a long validation
    dist.init_process_group(backend, timeout=timedelta(hours=2))
    return dist.get_rank(), world, device


def broadcast_from_rank0(value):
    """Rank 0's value on every process (a plain run: the value)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave():
    """Leave the process group, if this process joined one."""
    if distributed():
        dist.destroy_process_group()


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
    streams = ckpt["rng_ranks"]
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


GRADIENT_BUCKET = 2**24  # elements a gradient all-reduce carries at most (64 MB of fp32)


def average_gradients(params):
    """Every parameter's gradient averaged over the processes (DDP's reduction, done by hand after train_step has
    checked that every process finished its backward), in buckets of GRADIENT_BUCKET elements. A parameter
    without a gradient counts as a zero gradient (DDP's own reduction would have stopped on it). A plain run:
    nothing to do."""
    if not distributed():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params + [None]:
        if p is not None and (not bucket or (size + p.numel() <= GRADIENT_BUCKET and p.grad.dtype == bucket[0].dtype
                                             and p.grad.device == bucket[0].device)):
            bucket.append(p.grad)
            size += p.numel()
            continue
        if bucket:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        bucket, size = ([p.grad], p.numel()) if p is not None else ([], 0)
