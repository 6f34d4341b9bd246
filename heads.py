"""The RoI heads: what turns RPN proposals into scored boxes and masks, and owns their training losses.

    PresetRoIHeads   HEADS = "standard": torchvision's RoIHeads (one box head, IoU 0.5), whose training
                     forward computes the LOSSES preset's terms (losses.box_losses, losses.mask_losses);
                     inference is torchvision's but for the detection budget per class (class_budget).
    CascadeRoIHeads  HEADS = "cascade": Cascade R-CNN's three box stages (Cai & Vasconcelos 2018)

Both are built once, by model.build_model, from the parts of the torchvision RoIHeads that MaskRCNN made
(`from_torchvision`), and replace it as model.roi_heads.

The cascade:
    proposals -> stage 1 (IoU 0.5) -> refined boxes -> stage 2 (IoU 0.6) -> stage 3 (IoU 0.7) -> boxes
                 each stage: RoIAlign (shared) -> its own box head -> class scores + class-agnostic deltas

torchvision has no cascade; this follows detectron2's CascadeROIHeads (sampling, stage box coders, the
inference score, the mask head's RoIs):
- Training (detectron2's CascadeROIHeads): stage 1 matches the RPN proposals plus the cells (added as
  boxes, once) at IoU 0.5 and samples ROI_BATCH_SIZE RoIs (25% cells), as the standard head does. Each
  stage's class-agnostic deltas, encoded with its own box-coder weights (10,10,5,5 / 20,20,10,10 /
  30,30,15,15: later stages regress finer offsets), refine its boxes, detached, for the next stage, which
  only relabels them at its own threshold (0.6, 0.7): no cells added again, no re-sampling. (mmdetection
  adds the cells at every stage and re-samples: in an image of 700 cells most of stage 3's positives are
  then the cells' own boxes, a regressor that learns zero deltas.) Every loss preset applies per stage
  (losses.box_losses); a term is the stage sum with weights 1 / 0.5 / 0.25.
- The mask head trains on stage 1's cell RoIs (IoU >= 0.5, detectron2's choice: the 0.5-0.7 boxes on which
  AP50 is decided included) and predicts on the final boxes.
- Inference: score = the mean of the first `score_stages` stages' class probabilities (each on its own input
  boxes; all three by default, as detectron2; infer.py CASCADE_SCORE_STAGES), boxes = the last stage's
  regression; then the per-class post-processing of every head here (select_detections).
The RPN, RoIAlign, mask head and mask predictor are the standard model's; only the box head and
predictor are per stage (state_dict keys roi_heads.box_heads.<s>.*, roi_heads.box_predictors.<s>.*).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.ops import boxes as box_ops

import losses

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
METRIC_MAX_DETS = 100  # the leaderboard's pycocotools counts at most this many detections per image and class


def class_budget(scores, labels, detections_per_image, class_reserve=METRIC_MAX_DETS):
    """Indices of at most `detections_per_image` detections, highest score first, shared out by class: each class
    keeps its best min(class_reserve, detections_per_image // classes present) whatever the others score (the
    metric counts 100 per image AND class, so a dominant class's 101st detection must not push out a rare class's
    first), and the rest goes to the best of the remaining detections. class_reserve 0 is torchvision's one global
    top-k (infer.py CLASS_RESERVE)."""
    order = scores.argsort(descending=True, stable=True)
    if len(order) <= detections_per_image:
        return order
    ranked = labels[order]
    classes = ranked.unique()
    per_class = min(class_reserve, detections_per_image // len(classes))
    rank = torch.empty_like(order)  # each detection's place within its own class
    for c in classes:
        where = torch.where(ranked == c)[0]
        rank[where] = torch.arange(len(where), device=rank.device)
    reserved = rank < per_class
    others = torch.where(~reserved)[0][:max(detections_per_image - int(reserved.sum()), 0)]
    return order[torch.cat([torch.where(reserved)[0], others]).sort().values]


def select_detections(boxes, scores, score_thresh, nms_thresh, detections_per_image, class_reserve=METRIC_MAX_DETS):
    """One image's candidate boxes (N, K, 4) and probabilities (N, K) of the K foreground classes (labels
    1..K) -> {boxes, scores, labels}: torchvision's postprocess_detections (score threshold, tiny boxes out,
    class-wise NMS), then class_budget in place of its global top-k."""
    n, k = scores.shape
    labels = torch.arange(1, k + 1, device=scores.device).repeat(n)
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = box_ops.batched_nms(boxes, scores, labels, nms_thresh)
    keep = keep[class_budget(scores[keep], labels[keep], detections_per_image, class_reserve)]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def reset_parameters(module):
    """A fresh initialisation of every layer of module that has one (Linear, Conv, BatchNorm)."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class PresetRoIHeads(RoIHeads):
    """torchvision's RoIHeads whose training forward computes the LOSSES preset's box and mask terms.
    Sampling (torchvision's select_training_samples), the layers, inference (but the detection budget per
    class, postprocess_detections) and the state_dict keys are torchvision's, so checkpoints load under any
    preset. With `stock` the terms equal torchvision's fastrcnn_loss and maskrcnn_loss."""

    def __init__(self, *args, preset="stock", **kwargs):
        super().__init__(*args, **kwargs)
        self.classification = losses.classification(preset)  # refuses an unknown preset
        self.preset = preset
        self.class_reserve = METRIC_MAX_DETS  # inference: detections each class keeps (class_budget)

    @classmethod
    def from_torchvision(cls, heads, **kwargs):
        """This class built from the parts and settings of a torchvision RoIHeads (as MaskRCNN makes it)."""
        return cls(heads.box_roi_pool, heads.box_head, heads.box_predictor,
                   heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                   heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                   heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                   heads.mask_roi_pool, heads.mask_head, heads.mask_predictor, **kwargs)

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:  # torchvision's inference, in two steps that tiled prediction also calls apart
            return self.add_masks(features, self.detect(features, proposals, image_shapes), image_shapes), {}
        self.check_targets(targets)
        for t in targets:  # the checks torchvision's RoIHeads.forward makes first
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be of float type, instead got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be of int64 type, instead got {t['labels'].dtype}")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(
            self.box_roi_pool(features, proposals, image_shapes)))
        all_labels = torch.cat(labels)
        pos = torch.where(all_labels > 0)[0]
        deltas = box_regression.reshape(len(all_labels), -1, 4)[pos, all_labels[pos]]  # the cell class's deltas
        out = losses.box_losses(class_logits, deltas, all_labels, torch.cat(regression_targets)[pos],
                                torch.cat(proposals)[pos], self.box_coder, self.classification,
                                ciou=self.preset != "stock")
        if self.has_mask():
            out.update(self.mask_training_losses(features, image_shapes, targets, proposals, labels, matched_idxs))
        return [], out

    def detect(self, features, proposals, image_shapes):
        """Inference without masks: [{boxes, scores, labels}] per image (the box head on the proposals, then
        postprocess_detections)."""
        class_logits, box_regression = self.box_predictor(self.box_head(
            self.box_roi_pool(features, proposals, image_shapes)))
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]

    def add_masks(self, features, result, image_shapes):
        """Each detection's mask probabilities for its class ('masks', N x 1 x 28 x 28, box-relative): the mask
        head on the detections' boxes, as torchvision's RoIHeads does at inference."""
        if self.has_mask():
            mask_logits = self.mask_predictor(self.mask_head(
                self.mask_roi_pool(features, [r["boxes"] for r in result], image_shapes)))
            for r, m in zip(result, maskrcnn_inference(mask_logits, [r["labels"] for r in result])):
                r["masks"] = m
        return result

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's, with the detection budget per class (select_detections)."""
        counts = [len(p) for p in proposals]
        boxes = self.box_coder.decode(box_regression, proposals).split(counts)
        scores = F.softmax(class_logits, -1).split(counts)
        out = [select_detections(box_ops.clip_boxes_to_image(b, shape)[:, 1:], sc[:, 1:], self.score_thresh,
                                 self.nms_thresh, self.detections_per_img, self.class_reserve)
               for b, sc, shape in zip(boxes, scores, image_shapes)]
        return [o["boxes"] for o in out], [o["scores"] for o in out], [o["labels"] for o in out]

    def mask_training_losses(self, features, image_shapes, targets, boxes, labels, matched):
        """The mask head on the sampled cell RoIs of each image (the preset's mask terms)."""
        pos = [lab > 0 for lab in labels]
        mask_boxes = [b[p] for b, p in zip(boxes, pos)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        return losses.mask_losses(mask_logits, mask_boxes, [t["masks"] for t in targets],
                                  [t["labels"] for t in targets], [m[p] for m, p in zip(matched, pos)],
                                  extra_terms=self.preset != "stock")


class CascadeRoIHeads(PresetRoIHeads):
    """Three box stages in place of torchvision's one (box_heads, box_predictors: one per stage; there is
    no single box_head / box_predictor); RPN proposals, RoIAlign, mask head and the loss preset are the
    standard model's."""

    def __init__(self, box_roi_pool, box_heads, box_predictors, mask_roi_pool, mask_head, mask_predictor, *,
                 batch_size_per_image, positive_fraction, score_thresh, nms_thresh, detections_per_img,
                 preset="stock"):
        super().__init__(box_roi_pool, None, None, STAGE_IOUS[0], STAGE_IOUS[0], batch_size_per_image,
                         positive_fraction, STAGE_BOX_WEIGHTS[0], score_thresh, nms_thresh, detections_per_img,
                         mask_roi_pool, mask_head, mask_predictor, preset=preset)
        self.box_heads, self.box_predictors = nn.ModuleList(box_heads), nn.ModuleList(box_predictors)
        self.stage_matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in STAGE_IOUS]
        self.stage_coders = [det_utils.BoxCoder(w) for w in STAGE_BOX_WEIGHTS]
        self.stage_loss_weights = STAGE_LOSS_WEIGHTS
        self.score_stages = len(STAGE_IOUS)  # inference: the mean class probability of stages 1..score_stages

    @classmethod
    def from_torchvision(cls, heads, copy_weights=False, **kwargs):
        """A cascade from a torchvision RoIHeads' parts. Stage 1 takes its box head and predictor; stages 2
        and 3 copies of them, re-initialised unless copy_weights (a pretrained box head: every stage starts
        from it). Each stage predicts the class scores and 4 class-agnostic deltas (a fresh layer in place
        of the per-class one)."""
        box_heads, box_predictors = [], []
        for s in range(len(STAGE_IOUS)):
            head = heads.box_head if s == 0 else copy.deepcopy(heads.box_head)
            pred = heads.box_predictor if s == 0 else copy.deepcopy(heads.box_predictor)
            if s > 0 and not copy_weights:
                reset_parameters(head)
                reset_parameters(pred)
            pred.bbox_pred = nn.Linear(pred.bbox_pred.in_features, 4)
            box_heads.append(head)
            box_predictors.append(pred)
        return cls(heads.box_roi_pool, box_heads, box_predictors, heads.mask_roi_pool, heads.mask_head,
                   heads.mask_predictor, batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
                   positive_fraction=heads.fg_bg_sampler.positive_fraction, score_thresh=heads.score_thresh,
                   nms_thresh=heads.nms_thresh, detections_per_img=heads.detections_per_img, **kwargs)

    # ---- training: per-stage labels and losses ------------------------------------------------
    def label_stage(self, s, boxes, targets):
        """Stage s's training RoIs of each image, labelled at the stage's IoU threshold (cell >= t, background
        < t). Stage 1 (s=0) first adds the cells as boxes and samples ROI_BATCH_SIZE RoIs (25% cells) with the
        standard sampler, as torchvision's select_training_samples does with its one matcher and coder; later
        stages keep every box they are given (detectron2's _match_and_label_boxes). Returns lists (boxes,
        labels, matched cell, regression targets in the stage's coder)."""
        matcher, coder = self.stage_matchers[s], self.stage_coders[s]
        out = []
        for b, t in zip(boxes, targets):
            gt = t["boxes"].to(b.dtype)
            cand = torch.cat([b, gt]) if s == 0 else b
            if len(gt) == 0 or len(cand) == 0:  # a negative image (or no box left): every RoI is background
                matched = torch.zeros(len(cand), dtype=torch.int64, device=b.device)
                labels = torch.zeros_like(matched)
                gt = torch.zeros((1, 4), dtype=b.dtype, device=b.device)
            else:
                m = matcher(box_ops.box_iou(gt, cand))  # low == high threshold: cell or background
                matched = m.clamp(min=0)
                labels = t["labels"][matched].to(torch.int64)
                labels[m < 0] = 0
            if s == 0:
                pos, neg = self.fg_bg_sampler([labels])
                keep = torch.where(pos[0] | neg[0])[0]
                cand, labels, matched = cand[keep], labels[keep], matched[keep]
            out.append((cand, labels, matched, coder.encode_single(gt[matched], cand)))
        return [list(x) for x in zip(*out)]

    def stage_box_losses(self, s, class_logits, deltas, labels, regression_targets, boxes):
        """The preset's box terms of stage s (losses.box_losses on class-agnostic deltas)."""
        pos = labels > 0
        return losses.box_losses(class_logits, deltas[pos], labels, regression_targets[pos], boxes[pos],
                                 self.stage_coders[s], self.classification, ciou=self.preset != "stock")

    def combine_stage_losses(self, stage_losses):
        """Each box term summed over the stages with the stage weights (1, 0.5, 0.25)."""
        return {k: sum(w * d[k] for w, d in zip(self.stage_loss_weights, stage_losses))
                for k in stage_losses[0]}

    # ---- the cascade ----------------------------------------------------------------------------
    def run_stage(self, s, features, boxes, image_shapes):
        x = self.box_roi_pool(features, boxes, image_shapes)
        return self.box_predictors[s](self.box_heads[s](x))

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:  # detect (below), then the mask head on the final boxes
            return super().forward(features, proposals, image_shapes)
        self.check_targets(targets)
        boxes, stage_losses, first = proposals, [], None
        for s in range(len(self.box_heads)):
            boxes, labels, matched, regression_targets = self.label_stage(s, boxes, targets)
            first = first or (boxes, labels, matched)  # the mask head's RoIs: stage 1's
            class_logits, deltas = self.run_stage(s, features, boxes, image_shapes)
            stage_losses.append(self.stage_box_losses(s, class_logits, deltas, torch.cat(labels),
                                                      torch.cat(regression_targets), torch.cat(boxes)))
            # the next stage's input: this stage's refined RoIs, detached, without empty boxes (detectron2)
            refined = self.refine(s, deltas, boxes, image_shapes)
            boxes = [r.detach()[(r[:, 2] > r[:, 0]) & (r[:, 3] > r[:, 1])] for r in refined]
        out = self.combine_stage_losses(stage_losses)
        if self.has_mask():
            out.update(self.mask_training_losses(features, image_shapes, targets, *first))
        return [], out

    def refine(self, s, deltas, boxes, image_shapes):
        """Stage s's boxes moved by its deltas (its own coder), clipped to each image."""
        refined = self.stage_coders[s].decode_single(deltas, torch.cat(boxes)).split([len(b) for b in boxes])
        return [box_ops.clip_boxes_to_image(r, shape) for r, shape in zip(refined, image_shapes)]

    def detect(self, features, proposals, image_shapes):
        """Inference without masks: the three stages in turn, scored by the mean class probability of the
        first score_stages, boxed by the last stage's regression; [{boxes, scores, labels}] per image."""
        boxes, probs = proposals, []
        for s in range(len(self.box_heads)):
            class_logits, deltas = self.run_stage(s, features, boxes, image_shapes)
            if s < self.score_stages:
                probs.append(F.softmax(class_logits, -1))
            boxes = self.refine(s, deltas, boxes, image_shapes)
        scores = torch.stack(probs).mean(0).split([len(b) for b in boxes])  # the scoring stages' mean probability
        return [self.detections(b, sc) for b, sc in zip(boxes, scores)]

    def detections(self, boxes, scores):
        """One image's final boxes (N,4) and class probabilities (N,C) -> per-class detections
        (select_detections with the class-agnostic box for every class)."""
        n, c = scores.shape
        return select_detections(boxes[:, None].expand(n, c - 1, 4), scores[:, 1:], self.score_thresh,
                                 self.nms_thresh, self.detections_per_img, self.class_reserve)
