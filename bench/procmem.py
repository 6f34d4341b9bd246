"""What the benchmarks share: peak resident memory of this process, and one measurement per fresh process."""
import multiprocessing as mp
from pathlib import Path

import torch


def sync(device):
    """Wait for the device's queued work (CUDA), so a timer reads the work done, not the work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb(field):
    """VmRSS (now) or VmHWM (peak since the last reset_peak) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def in_fresh_process(target, *args):
    """target(*args, queue) in a spawned process: its result, or None where the process died (out of memory)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else None


def start_peaks(cuda):
    """Zero the peak counters (host VmHWM; CUDA allocator if cuda): returns the host level to measure from."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = rss_mb("VmRSS")
    reset_peak()
    return base
