"""Run train.py under torchrun with faults injected (tests/test_ddp.py): rank 1 runs out of GPU memory in its
second training step, rank 0 gets an infinite gradient in its third.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_faults.py <train.py arguments>
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import losses  # noqa: E402
import train  # noqa: E402
from conftest import InfiniteGradient  # noqa: E402


RANK = int(os.environ["RANK"])
FAULTS = {(1, 2): "oom", (0, 3): "inf"}  # (rank, training step of this process) -> fault
weighted_total, calls = losses.weighted_total, [0]


def faulty_total(loss_dict, weights):
    if not torch.is_grad_enabled():  # the val loss
        return weighted_total(loss_dict, weights)
    calls[0] += 1
    fault = FAULTS.get((RANK, calls[0]))
    if fault == "oom":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
    total = weighted_total(loss_dict, weights)
    return InfiniteGradient.apply(total) if fault == "inf" else total


losses.weighted_total = faulty_total
train.main(sys.argv[1:])
