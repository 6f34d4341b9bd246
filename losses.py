"""Training losses. For now torchvision's stock Mask R-CNN set, weighted per term:

    loss_objectness, loss_rpn_box_reg   RPN: BCE objectness + smooth-L1 on anchor deltas
    loss_classifier                     box head: cross-entropy over background + 4 classes
    loss_box_reg                        box head: smooth-L1 on the ground-truth class's deltas
    loss_mask                           mask head: per-pixel BCE on the 28x28 targets

LOSSES picks a preset; LOSS_WEIGHTS ({term: weight}) scales each term (missing terms weigh 1).
"""
import torch

LOSS_TERMS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
PRESETS = ("stock",)


def configure_losses(model, preset="stock"):
    """Install the preset's losses in a torchvision MaskRCNN (stock: torchvision's own)."""
    if preset not in PRESETS:
        raise ValueError(f"LOSSES={preset!r} is not a known preset; choose one of {', '.join(PRESETS)}")
    return model


def weighted_total(loss_dict, weights=None):
    """Sum of the loss terms, each scaled by its weight in `weights` (default 1)."""
    weights = weights or {}
    unknown = set(weights) - set(loss_dict)
    if unknown:
        raise ValueError(f"LOSS_WEIGHTS names unknown loss terms {sorted(unknown)}; terms are {sorted(loss_dict)}")
    return sum(loss * float(weights.get(name, 1.0)) for name, loss in loss_dict.items())


def check_finite(loss_dict):
    """True if every term is finite (a NaN/inf step is skipped rather than poisoning the weights)."""
    return all(torch.isfinite(v).all() for v in loss_dict.values())
