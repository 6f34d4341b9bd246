"""Training losses: torchvision's stock Mask R-CNN set, or the report's set, chosen by LOSSES.

    term               stock                   ciou_dice_boundary          report
    loss_objectness    RPN BCE          x1     stock                       stock
    loss_rpn_box_reg   RPN smooth-L1    x1     stock                       stock
    loss_classifier    cross-entropy    x1     cross-entropy  x1           focal (alpha .25, gamma 2)  x2.5
    loss_box_reg       smooth-L1 (deltas) x1   smooth-L1      x0.5         smooth-L1                   x0.5
    loss_box_ciou      -                       CIoU (boxes)   x CIOU_WEIGHT   CIoU (boxes)             x CIOU_WEIGHT
    loss_mask          BCE (28x28)      x1     BCE            x1/3         BCE                         x1/3
    loss_dice          -                       Dice           x1/3         Dice                        x1/3
    loss_boundary      -                       boundary       x0.1/3       boundary                    x0.1/3

The report ADDS its terms to the stock ones, and the authors' code sums them so: box = 0.5 x
smooth-L1 + IoU term, mask = (BCE + Dice + 0.1 x boundary) / 3, classification = 2.5 x focal.
Their IoU term (weight 5) ran on encoded deltas; ours is CIoU on decoded boxes in pixels, a term of
another scale, so its weight CIOU_WEIGHT is our own (see README, Losses). Every term of a preset is
computed and logged; LOSS_WEIGHTS ({term: weight}) overrides a preset's weights, e.g.
'{"loss_box_ciou": 5}'.

Pure functions of tensors: the RoI heads (heads.py) call box_losses and mask_losses with what they
sampled; with `stock` these equal torchvision's fastrcnn_loss and maskrcnn_loss (tested), but for the
memory-lean mask-target projection below.
"""
import torch
import torch.nn.functional as F
from torchvision.ops import complete_box_iou_loss, roi_align

LOSS_TERMS = ("loss_classifier", "loss_box_reg", "loss_box_ciou", "loss_mask", "loss_dice", "loss_boundary",
              "loss_objectness", "loss_rpn_box_reg")
_STOCK = {"loss_classifier": 1.0, "loss_box_reg": 1.0, "loss_mask": 1.0, "loss_objectness": 1.0,
          "loss_rpn_box_reg": 1.0}
CIOU_WEIGHT = 1.0
_REPORT_TERMS = {"loss_box_reg": 0.5, "loss_box_ciou": CIOU_WEIGHT,
                 "loss_mask": 1 / 3, "loss_dice": 1 / 3, "loss_boundary": 0.1 / 3}
PRESETS = {  # preset -> (classification loss, default weight of each term)
    "stock": ("ce", _STOCK),
    "ciou_dice_boundary": ("ce", {**_STOCK, **_REPORT_TERMS}),
    "report": ("focal", {**_STOCK, **_REPORT_TERMS, "loss_classifier": 2.5}),
}
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


# ----------------------------------------------------------------------------------------------
# the terms
def focal_loss(logits, labels, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA):
    """Multi-class (softmax) focal loss of Lin et al. 2017 over the sampled RoIs.

    Per RoI: -alpha_t * (1 - p_t)^gamma * log p_t, with p_t the softmax probability of its label.
    Background is class 0 of the softmax, a class like the others: an easy background RoI
    (p_t near 1) is down-weighted by (1 - p_t)^gamma exactly as an easy cell is. alpha_t as Lin et
    al.: alpha for cell RoIs, 1 - alpha for background RoIs. 0.25 and gamma 2 are RetinaNet's values,
    tuned together; alpha does not balance the counts: with the sampler's 1:3 cell-to-background RoIs
    (128:384 of 512) it weighs cells less still (about 1:9 in all), while gamma takes the easy
    background out. gamma = 0 and alpha = 0.5 is half the cross-entropy.

    Normalisation: the sum over RoIs divided by the number of sampled RoIs (cells and background),
    the mean that torchvision's cross-entropy takes, so the term keeps its scale when the number of
    RoIs changes (the report weighs it x2.5). RetinaNet divides by the number of positive anchors
    instead because it scores every anchor (~100k, nearly all easy background); here the sampler
    already fixed the count. (torchvision.ops.sigmoid_focal_loss is the one-vs-all sigmoid form.)
    """
    log_p = F.log_softmax(logits, dim=-1)
    log_pt = log_p.gather(1, labels[:, None])[:, 0]
    pt = log_pt.exp()
    alpha_t = torch.where(labels > 0, torch.full_like(pt, alpha), torch.full_like(pt, 1.0 - alpha))
    loss = -alpha_t * (1.0 - pt).clamp(min=0).pow(gamma) * log_pt
    return loss.sum() / max(labels.numel(), 1)


def dice_loss(mask_logits, targets, eps=1.0):
    """1 - soft Dice per RoI (sigmoid probabilities vs 28x28 targets), averaged over RoIs.
    eps smooths empty targets: an empty prediction of an empty target costs 0."""
    p = mask_logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


def _squared_distance_to(points):
    """(M,H,W) bool -> squared Euclidean distance of every pixel to the nearest True pixel (inf if none).

    Exact separable distance transform done as two brute-force 1-D min-plus passes, which is
    cheap at 28x28 (M*28^3 per pass), stays on the tensor's device (no GPU->CPU sync) and
    batches all RoIs; scipy.ndimage.distance_transform_edt would need a host round trip per step.
    """
    m, h, w = points.shape
    f = torch.where(points, 0.0, float("inf")).to(torch.float32)
    ax = torch.arange(w, device=points.device, dtype=torch.float32)
    ay = torch.arange(h, device=points.device, dtype=torch.float32)
    g = (f[:, :, None, :] + (ax[:, None] - ax[None, :]) ** 2).amin(-1)  # along x: (M,H,W)
    return (g.transpose(1, 2)[:, :, None, :] + (ay[:, None] - ay[None, :]) ** 2).amin(-1).transpose(1, 2)


def signed_distance(targets):
    """Signed distance map of binary (M,H,W) targets as in Kervadec et al. 2019: outside, the
    distance to the object; inside, minus (distance to the background - 1). Zero for a target
    that is empty or full (no boundary to measure from)."""
    t = targets > 0.5
    d_out = _squared_distance_to(t).sqrt()
    d_in = _squared_distance_to(~t).sqrt()
    phi = torch.where(t, -(d_in - 1), d_out)
    has_boundary = t.flatten(1).any(1) & (~t).flatten(1).any(1)
    return torch.where(has_boundary[:, None, None], phi, torch.zeros_like(phi))


def boundary_loss(mask_logits, targets):
    """Boundary loss (Kervadec et al. 2019): mean over pixels of foreground probability times the
    target's signed distance map; lowest when the prediction is exactly the target."""
    with torch.no_grad():
        phi = signed_distance(targets)
    return (mask_logits.sigmoid() * phi).mean()


def project_masks_on_boxes(gt_masks, boxes, matched_idxs, M):
    """torchvision's project_masks_on_boxes (the MxM mask targets of the positive RoIs) without its
    float32 copy of every ground-truth mask of the image: each RoI's matched mask is cropped to the
    RoI plus a margin before roi_align, which samples only inside the RoI, so the values are the same."""
    if len(boxes) == 0:
        return torch.zeros((0, M, M), dtype=torch.float32, device=gt_masks.device)
    h, w = gt_masks.shape[-2:]
    b = boxes.detach().float()
    crops = torch.stack([(b[:, 0].floor() - 1).clamp(0, w), (b[:, 1].floor() - 1).clamp(0, h),
                         (b[:, 2].ceil() + 2).clamp(0, w), (b[:, 3].ceil() + 2).clamp(0, h)], 1)
    # every RoI in its crop's frame, as roi_align's (batch index 0, x0, y0, x1, y1) rows: made on the
    # device in one go (no small host tensor copied per RoI)
    rois = torch.cat([b.new_zeros(len(b), 1), b - crops[:, [0, 1, 0, 1]]], 1)
    targets = []
    windows = torch.cat([crops.long(), matched_idxs[:, None].to(crops.device)], 1).tolist()  # the one host sync
    for n, (x0, y0, x1, y1, idx) in enumerate(windows):
        crop = gt_masks[idx, y0:y1, x0:x1][None, None].float()
        targets.append(roi_align(crop, rois[n:n + 1], (M, M), 1.0)[0, 0])
    return torch.stack(targets)


def box_losses(class_logits, deltas, labels, regression_targets, proposals, box_coder, classification="ce",
               ciou=True):
    """The box head's terms over one batch of sampled RoIs: loss_classifier, loss_box_reg and (ciou=True)
    loss_box_ciou. class_logits (N, C) and labels (N,) of every sampled RoI; deltas, regression_targets and
    proposals (P, 4) of the P positive ones (deltas of the ground-truth class, or class-agnostic).
    classification: 'ce' or 'focal'. The box terms are summed over positives and divided by all N sampled
    RoIs, like torchvision's smooth-L1 (and detectron2's GIoU); shared by the standard and the cascade heads."""
    n = max(labels.numel(), 1)
    out = {"loss_classifier": focal_loss(class_logits, labels) if classification == "focal"
           else F.cross_entropy(class_logits, labels),
           "loss_box_reg": F.smooth_l1_loss(deltas, regression_targets, beta=1 / 9, reduction="sum") / n}
    if ciou:  # CIoU on boxes: the predicted deltas and the targets (= the matched cells) decoded against the
        # same proposals
        pred_boxes = box_coder.decode_single(deltas, proposals)
        gt_boxes = box_coder.decode_single(regression_targets, proposals)
        out["loss_box_ciou"] = complete_box_iou_loss(pred_boxes, gt_boxes, reduction="sum") / n
    return out


def mask_losses(mask_logits, mask_proposals, gt_masks, gt_labels, mask_matched_idxs, extra_terms=True):
    """The mask head's terms: loss_mask (BCE on 28x28 targets, torchvision's) and, with extra_terms, loss_dice
    and loss_boundary, on the logits of each positive RoI's ground-truth class. Arguments as torchvision's
    maskrcnn_loss (per image lists); targets come from the lean project_masks_on_boxes."""
    size = mask_logits.shape[-1]
    labels = torch.cat([lab[i] for lab, i in zip(gt_labels, mask_matched_idxs)], 0)
    mask_targets = torch.cat([project_masks_on_boxes(m, p, i, size)
                              for m, p, i in zip(gt_masks, mask_proposals, mask_matched_idxs)], 0)
    if mask_targets.numel() == 0:
        zero = mask_logits.sum() * 0
        return {"loss_mask": zero, **({"loss_dice": zero, "loss_boundary": zero} if extra_terms else {})}
    logits = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    out = {"loss_mask": F.binary_cross_entropy_with_logits(logits, mask_targets)}
    if extra_terms:
        out["loss_dice"] = dice_loss(logits, mask_targets)
        out["loss_boundary"] = boundary_loss(logits, mask_targets)
    return out


def classification(preset):
    """The classification loss of a preset: 'ce' or 'focal'."""
    if preset not in PRESETS:
        raise ValueError(f"LOSSES={preset!r} is not a known preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset][0]


def preset_weights(preset, overrides=None):
    """The preset's weight of each term, updated by LOSS_WEIGHTS."""
    weights = dict(PRESETS[preset][1])
    unknown = set(overrides or {}) - set(LOSS_TERMS)
    if unknown:
        raise ValueError(f"LOSS_WEIGHTS names unknown loss terms {sorted(unknown)}; terms are {list(LOSS_TERMS)}")
    weights.update({k: float(v) for k, v in (overrides or {}).items()})
    return weights


def weighted_total(loss_dict, weights):
    """Sum of the loss terms, each scaled by its weight (a term the weights do not name weighs 0)."""
    return sum(loss * weights.get(name, 0.0) for name, loss in loss_dict.items())
