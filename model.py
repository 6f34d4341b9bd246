"""The report's model: torchvision MaskRCNN on a timm backbone with an FPN over its last four stages.

    image [0,1], already at the input size (dataset.resize_factor: MIN_SIZE/MAX_SIZE or a fixed SCALE)
    -> normalise with the backbone's own mean/std (the only normalisation) -> timm features_only (strides 4..32)
    -> FeaturePyramidNetwork (+ max-pool level) -> RPN with the report's anchors
    -> box head (RoIAlign 7, sampling 2) -> mask head (RoIAlign 14, sampling 4)
"""
import os
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_V2_Weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from heads import CascadeRoIHeads, PresetRoIHeads
from utils import NUM_CLASSES, CheckpointError

ANCHOR_SIZES = ((4, 8), (16, 32), (32, 64), (64, 128), (128, 256))  # one pair per FPN level P2..P6
ASPECT_RATIOS = (0.5, 1.0, 2.0)
COCO_FPN_CHANNELS = 256  # the width of torchvision's COCO model
HEAD_CLASSES = {"standard": PresetRoIHeads, "cascade": CascadeRoIHeads}  # HEADS -> the RoI heads class (heads.py)


def check_config(cfg):
    """The model constants a configuration cannot build with (HEADS, the COCO model's FPN width): ValueError."""
    if cfg["HEADS"] not in HEAD_CLASSES:
        raise ValueError(f"HEADS {cfg['HEADS']!r}: choose one of {', '.join(HEAD_CLASSES)}")
    if cfg["BACKBONE"] == COCO_MODEL and cfg["FPN_CHANNELS"] != COCO_FPN_CHANNELS:
        raise ValueError(f"BACKBONE {COCO_MODEL} has {COCO_FPN_CHANNELS} FPN channels: set FPN_CHANNELS "
                         f"{COCO_FPN_CHANNELS} (it is {cfg['FPN_CHANNELS']})")
FPN_BN_MIN_BATCH = 8  # COCO start: the FPN's BatchNorm stays live only from this many images per process a step
REPRESENTATION_SIZE = 1024  # the box head's output features (torchvision's TwoMLPHead and the COCO head)


def freeze_batchnorm(module):
    """Replace every BatchNorm2d by torchvision's FrozenBatchNorm2d (fixed statistics and affine).

    timm's norm+activation layers (BatchNormAct2d) go to timm's frozen twin, which keeps the
    activation that a plain FrozenBatchNorm2d would drop.
    """
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm2d, nn.SyncBatchNorm):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.affine:
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
            if child.track_running_stats:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return timm.layers.freeze_batch_norm_2d(module)  # BatchNormAct2d and other timm norms


def parse_freeze_bn(value):
    """FREEZE_BN as given (bool, or 'auto'/'true'/'false' from the command line) -> True, False or 'auto'."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return {"true": True, "false": False}.get(text, "auto")
    raise ValueError(f"FREEZE_BN {value!r}: choose auto, true or false")


def freeze_bn_setting(cfg):
    """(freeze?, why) for a run configuration. FREEZE_BN 'auto' freezes BatchNorm where the backbone
    starts from pretrained weights (PRETRAINED or PRETRAINED_WEIGHTS): their statistics are good and
    batch-1 statistics would be noise. It keeps BatchNorm live where the backbone starts from random
    values: frozen there, BatchNorm would stay at its initial values for ever, and timm zero-initialises
    the last BatchNorm of every residual block, so every residual branch would output zero.
    true/false force it."""
    setting = parse_freeze_bn(cfg["FREEZE_BN"])
    pretrained = bool(cfg["PRETRAINED"] or cfg["PRETRAINED_WEIGHTS"])
    if setting != "auto":
        return setting, f"FREEZE_BN {str(setting).lower()}"
    if pretrained:
        return True, "FREEZE_BN auto: pretrained weights, their BatchNorm statistics kept (batch-1 statistics are noise)"
    return False, ("FREEZE_BN auto: random backbone, BatchNorm learns (frozen, timm's zero-initialised "
                   "BatchNorms would silence every residual branch)")


def freeze_fpn_bn_setting(cfg):
    """FREEZE_FPN_BN (the COCO start's FPN BatchNorm) resolved: 'auto' (or absent) freezes it where FREEZE_BN
    freezes the body and fewer than FPN_BN_MIN_BATCH images a step reach each process; true/false force it."""
    setting = parse_freeze_bn(cfg.get("FREEZE_FPN_BN", "auto"))
    if setting != "auto":
        return setting
    return bool(freeze_bn_setting(cfg)[0] and cfg.get("BATCH_SIZE", 1) < FPN_BN_MIN_BATCH)


class PretrainedWeightsError(RuntimeError):
    pass


def create_timm_features(name, pretrained=False, pretrained_weights=""):
    """timm backbone returning its last four feature levels. Pretrained weights come from timm's hub
    (pretrained=True) or from a local file (pretrained_weights); a failure stops with advice and
    never falls back to random weights."""
    kwargs = dict(features_only=True, out_indices=(-4, -3, -2, -1))
    if pretrained_weights:
        path = Path(pretrained_weights)
        if not path.is_file():
            raise PretrainedWeightsError(f"PRETRAINED_WEIGHTS file {path} does not exist")
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        except Exception as e:
            raise PretrainedWeightsError(
                f"could not load PRETRAINED_WEIGHTS {path} into timm model {name!r}: {e}") from e
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise PretrainedWeightsError(
                f"could not download pretrained weights for timm model {name!r} ({type(e).__name__}: {e}). "
                "Without internet, download the weights on a connected machine and set PRETRAINED_WEIGHTS "
                "(--pretrained-weights path/to/model.safetensors), or train from scratch with --pretrained false."
            ) from e
    return timm.create_model(name, pretrained=False, **kwargs)


class TimmFPN(nn.Module):
    """timm features (4 levels) -> FPN with a max-pool P6; returns {'0','1','2','3','pool'}."""

    def __init__(self, body, out_channels):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x):
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class BoxMaskTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, batch), with two changes.

    - No resizing: images arrive at the model's input size already (dataset.resize_factor, done by
      CellDataset for training and by predict.predict_image at inference), so ground-truth masks are
      only ever made at that size, as uint8. torchvision's resize turns all N masks of an image into
      one float32 N x H x W copy (772 masks of 1731x2162 px would take 11 GB).
    - At inference masks stay box-relative: the output has `mask_probs` (N,1,28,28) instead of
      `masks` (N,1,H,W). Pasting all N masks into full-size float images is what makes stock
      inference slow and memory-hungry at 1000 detections (1000 x 2500 x 1987 floats = 20 GB);
      predict.image_records pastes each into its box region only.
    """

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        """Boxes are already in the input's pixels (nothing was resized); masks stay box-relative."""
        if not self.training:
            for pred in result:
                if "masks" in pred:
                    pred["mask_probs"] = pred.pop("masks")
        return result


class CellMaskRCNN(MaskRCNN):
    """torchvision's MaskRCNN, whose inference can also run in two steps (torchvision's forward has no
    boxes-only mode): detect() finds the boxes and keeps the features, segment() runs the mask head on chosen
    boxes over them. Tiled prediction (predict.predict_tiled) finds every tile's boxes, keeps
    DETECTIONS_PER_IMAGE of them for the whole image, and only then runs the mask head, on those alone."""

    def detect(self, images):
        """([{boxes, scores, labels}] of each image (a list of CxHxW tensors at the input size), no masks;
        the features and input sizes that segment() takes)."""
        image_list, _ = self.transform(images)
        features = self.backbone(image_list.tensors)
        proposals, _ = self.rpn(image_list, features)
        return self.roi_heads.detect(features, proposals, image_list.image_sizes), (features, image_list.image_sizes)

    def segment(self, encoded, detections):
        """The detections of each image ({boxes, labels}, in its input pixels) with their box-relative mask
        probabilities ('mask_probs', N x 1 x 28 x 28, as the forward's), from detect()'s features."""
        features, sizes = encoded
        result = self.roi_heads.add_masks(features, [dict(d) for d in detections], sizes)
        return self.transform.postprocess(result, sizes, sizes)


# ---- fp32 box geometry under autocast ----------------------------------------------------------
# Under AMP the convolutions run in fp16/bf16, and torchvision lets box geometry follow them:
# AnchorGenerator takes its dtype from the feature maps (bf16 anchors snap to 4-8 px steps near
# x = 1000) and BoxCoder.decode casts proposals to the deltas' dtype. Validation and inference run
# in fp32, so training would see other anchors and proposals than test time, and CIoU of perfect
# deltas would not be 0. The classes below keep anchors, the heads' box and mask outputs, and so
# every proposal, decoded box and loss input in fp32; the layers themselves (but the tiny box
# predictor) still run in half precision. They change no parameter or state_dict key.
class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator, always in fp32 (it reads only the feature maps' shape, dtype, device)."""

    def forward(self, image_list, feature_maps):
        shapes = [torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, shapes)


class Float32RPNHead(RPNHead):
    """The RPN head's convolutions under autocast; its objectness and box deltas handed on in fp32."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32BoxPredictor(FastRCNNPredictor):
    """The box predictor (two small linear layers) computed in fp32: class scores and box deltas."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class Float32MaskPredictor(MaskRCNNPredictor):
    """The mask predictor's mask logits handed on in fp32 (mask losses in fp32)."""

    def forward(self, x):
        return super().forward(x).float()


class BoxPair:
    """What the RPN's box_similarity hands to ChunkedMatcher: the two box sets, not their IoU matrix."""

    def __init__(self, gt_boxes, anchors):
        self.gt_boxes, self.anchors = gt_boxes, anchors


class ChunkedMatcher(Matcher):
    """torchvision's Matcher, with the ground-truth x anchor IoU computed a block of anchors at a time.

    The stock RPN builds the whole G x A IoU matrix, through box_iou's G x A x 2 temporaries: 772
    cells x 410k anchors (an 800 x 999 input, 6 anchors per stride-4 position) is about 10 GB.
    Here the peak is one block. Same matches as the stock matcher, ties included (tested)."""

    block = 2**22  # IoU values per block

    def __call__(self, pair):
        gt, anchors = pair.gt_boxes, pair.anchors
        blocks = anchors.split(max(1, self.block // len(gt)))
        vals, idxs, best_per_gt = [], [], None
        for a in blocks:
            iou = box_iou(gt, a)
            v, i = iou.max(dim=0)
            vals.append(v)
            idxs.append(i)
            top = iou.max(dim=1).values
            best_per_gt = top if best_per_gt is None else torch.maximum(best_per_gt, top)
        matched_vals, matches = torch.cat(vals), torch.cat(idxs)
        all_matches = matches.clone()
        matches[matched_vals < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        matches[(matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)] = self.BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:  # each cell keeps the anchors it overlaps most, ties included
            start = 0
            for a in blocks:
                best = start + (box_iou(gt, a) == best_per_gt[:, None]).any(dim=0).nonzero()[:, 0]
                matches[best] = all_matches[best]
                start += len(a)
        return matches


# ---- COCO-pretrained start: torchvision's Mask R-CNN v2, taken whole ---------------------------
# BACKBONE = COCO_MODEL builds the architecture of torchvision's maskrcnn_resnet50_fpn_v2 (ResNet-50 +
# FPN, two-conv RPN head, 4-conv + FC box head, 4-conv mask head, BatchNorm throughout) and starts it
# from its COCO weights; anchors, RoIAlign, classes, thresholds and losses are build_model's, as for timm.
COCO_MODEL = "torchvision/maskrcnn_resnet50_fpn_v2"
CLASS_LAYERS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")  # COCO's 91 classes: fresh
ANCHOR_LAYERS = ("rpn.head.cls_logits.", "rpn.head.bbox_pred.")  # fresh where the anchors per position differ


def coco_parts(cfg, num_anchors):
    """(backbone, {MaskRCNN's head arguments}) of maskrcnn_resnet50_fpn_v2, random and with live BatchNorm.
    Every layer trains: torchvision's builder with weights trains only the last 3 backbone stages, we
    train all, like the timm path. Made in the order torchvision's builder and MaskRCNN draw their random
    initial weights, so a seed gives the weights it gives there."""
    backbone = BackboneWithFPN(resnet50(), {f"layer{i + 1}": str(i) for i in range(4)}, [256, 512, 1024, 2048],
                               COCO_FPN_CHANNELS, extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
    c, parts = backbone.out_channels, {}
    parts["rpn_head"] = Float32RPNHead(c, num_anchors, conv_depth=2)
    parts["box_head"] = FastRCNNConvFCHead((c, 7, 7), [256] * 4, [REPRESENTATION_SIZE], norm_layer=nn.BatchNorm2d)
    parts["mask_head"] = MaskRCNNHeads(c, [256] * 4, 1, norm_layer=nn.BatchNorm2d)
    parts["mask_predictor"] = Float32MaskPredictor(256, 256, NUM_CLASSES + 1)
    parts["box_predictor"] = Float32BoxPredictor(REPRESENTATION_SIZE, NUM_CLASSES + 1)
    return backbone, parts


def coco_state_dict(cfg):
    """(state_dict, where from): PRETRAINED_WEIGHTS (a local .pth) wins over torchvision's hub. A failure
    stops with advice and never falls back to random weights."""
    if cfg["PRETRAINED_WEIGHTS"]:
        path = Path(cfg["PRETRAINED_WEIGHTS"])
        if not path.is_file():
            raise PretrainedWeightsError(f"PRETRAINED_WEIGHTS file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PretrainedWeightsError(f"PRETRAINED_WEIGHTS {path} is unreadable as a torch .pth: {e}") from e
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a training checkpoint such as torchvision's reference scripts write
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise PretrainedWeightsError(f"PRETRAINED_WEIGHTS {path} holds no state_dict (nor {{'model': state_dict}})")
        return state, str(path)
    weights = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True), weights.url
    except Exception as e:
        raise PretrainedWeightsError(
            f"could not download torchvision's COCO weights for {COCO_MODEL} ({type(e).__name__}: {e}). "
            f"Without internet, download {weights.url} on a connected machine and set PRETRAINED_WEIGHTS "
            "(--pretrained-weights path/to/that.pth), or train from scratch with --pretrained false."
        ) from e


def load_coco_weights(model, state, source):
    """Load every tensor of the file whose name and shape our model shares, except the class layers
    (left at their fresh init); the RPN's per-anchor layers load only where their shapes agree. Any
    other key of the file or of the model that does not fit means a wrong file: refused, nothing loaded.
    Returns the summary for the run log."""
    own = model.state_dict()
    # BatchNorm's batch counters only matter with momentum=None; a frozen-BatchNorm model saves none
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    take, reset, wrong = {}, [], []
    for k, v in state.items():
        if k not in own:
            continue
        if k.startswith(CLASS_LAYERS) or (k.startswith(ANCHOR_LAYERS) and v.shape != own[k].shape):
            reset.append(k)
        elif v.shape == own[k].shape:
            take[k] = v
        else:
            wrong.append(f"{k} {tuple(v.shape)} (ours {tuple(own[k].shape)})")
    if missing or unexpected or wrong:
        problems = [f"{what} {len(keys)}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" for what, keys
                    in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys]
        raise PretrainedWeightsError(f"{source} does not hold {COCO_MODEL}'s weights (keys {'; '.join(problems)})")
    model.load_state_dict(take, strict=False)
    classes = [s["roi_heads.box_predictor.cls_score.weight"].shape[0] for s in (own, state)]
    anchors = [s["rpn.head.cls_logits.weight"].shape[0] for s in (own, state)]
    fresh = [f"roi_heads.box_predictor ({classes[0]} classes, file has {classes[1]})",
             "roi_heads.mask_predictor.mask_fcn_logits"]
    if any(k.startswith(ANCHOR_LAYERS) for k in reset):
        fresh.append(f"rpn.head.cls_logits/bbox_pred ({anchors[0]} anchors per position, file has {anchors[1]})")
    return f"loaded {len(take)} tensors from {source}; re-initialised: {', '.join(fresh)}"


def timm_parts(cfg, num_anchors, load_pretrained):
    """(backbone, {MaskRCNN's head arguments}, timm's data config) of the recipe: a timm backbone (its
    pretrained weights where asked; FREEZE_BN) with an FPN, torchvision's four-conv mask head, RPN head and
    two-layer box head. Made in the order MaskRCNN's constructor draws their random initial weights (mask
    parts first), so a seed gives the weights torchvision's own defaults would."""
    body = create_timm_features(cfg["BACKBONE"], pretrained=load_pretrained and cfg["PRETRAINED"],
                                pretrained_weights=cfg["PRETRAINED_WEIGHTS"] if load_pretrained else "")
    if freeze_bn_setting(cfg)[0]:
        body = freeze_batchnorm(body)
    c, parts = cfg["FPN_CHANNELS"], {}
    backbone = TimmFPN(body, c)
    parts["mask_head"] = MaskRCNNHeads(c, [256] * 4, 1)
    parts["mask_predictor"] = Float32MaskPredictor(256, 256, NUM_CLASSES + 1)
    parts["rpn_head"] = Float32RPNHead(c, num_anchors)
    parts["box_head"] = TwoMLPHead(c * 7 * 7, REPRESENTATION_SIZE)
    parts["box_predictor"] = Float32BoxPredictor(REPRESENTATION_SIZE, NUM_CLASSES + 1)
    return backbone, parts, body.pretrained_cfg


def build_model(cfg, load_pretrained=True):
    """The Mask R-CNN of a run configuration (train.py's constants), built in this one place:

        CellMaskRCNN (torchvision's MaskRCNN, + detect/segment: its inference in two steps)
          .transform   BoxMaskTransform: normalise with the backbone's mean/std, no resizing, box-relative masks
          .backbone    TimmFPN (timm features_only + FPN), or torchvision's ResNet-50 FPN for COCO_MODEL
          .rpn         torchvision's RPN with Float32AnchorGenerator (the report's anchors), Float32RPNHead,
                       ChunkedMatcher (ground truth x anchor IoU a block of anchors at a time)
          .roi_heads   HEADS "standard": heads.PresetRoIHeads, "cascade": heads.CascadeRoIHeads, either with
                       the LOSSES preset; box RoIAlign 7 (sampling 2), Float32BoxPredictor, mask RoIAlign 14
                       (sampling 4), four-conv mask head, Float32MaskPredictor

    MaskRCNN's constructor takes the parts it has arguments for; the transform and the RoI heads, for which
    it has none, replace the ones it made. load_pretrained=False builds the same architecture without
    fetching weights (a checkpoint is loaded over it). The score threshold, NMS and detection limit are
    torchvision's until set_thresholds gives them a prediction's settings (infer.py's constants).
    """
    check_config(cfg)
    anchors = Float32AnchorGenerator(ANCHOR_SIZES, (ASPECT_RATIOS,) * len(ANCHOR_SIZES))
    coco = cfg["BACKBONE"] == COCO_MODEL
    if coco:  # torchvision's COCO Mask R-CNN v2 (its weights load once it is whole, below)
        backbone, parts = coco_parts(cfg, anchors.num_anchors_per_location()[0])
        data_cfg = {}  # ImageNet mean/std below: what torchvision's COCO weights expect
    else:
        backbone, parts, data_cfg = timm_parts(cfg, anchors.num_anchors_per_location()[0], load_pretrained)
    model = CellMaskRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=4),
        box_batch_size_per_image=cfg["ROI_BATCH_SIZE"], **parts)
    model.transform = BoxMaskTransform(cfg["MIN_SIZE"], cfg["MAX_SIZE"],
                                       image_mean=list(data_cfg.get("mean", (0.485, 0.456, 0.406))),
                                       image_std=list(data_cfg.get("std", (0.229, 0.224, 0.225))))
    stock = model.rpn.proposal_matcher
    model.rpn.box_similarity = BoxPair
    model.rpn.proposal_matcher = ChunkedMatcher(stock.high_threshold, stock.low_threshold,
                                                stock.allow_low_quality_matches)
    model.pretrained_report = None  # what a COCO start loaded, for the run log
    if coco and load_pretrained and (cfg["PRETRAINED"] or cfg["PRETRAINED_WEIGHTS"]):
        model.pretrained_report = load_coco_weights(model, *coco_state_dict(cfg))
        if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
            print(f"{COCO_MODEL}: {model.pretrained_report}")
    if coco and freeze_bn_setting(cfg)[0]:  # the ResNet body, where torchvision's v1 builder freezes it, and ...
        model.backbone.body = freeze_batchnorm(model.backbone.body)
    if coco and freeze_fpn_bn_setting(cfg):  # v2's FPN BatchNorm, which at batch 1 would learn from one image
        model.backbone.fpn = freeze_batchnorm(model.backbone.fpn)
    options = {"preset": cfg["LOSSES"]}
    if cfg["HEADS"] == "cascade":  # a COCO box head (loaded above) starts every stage; a random one is drawn anew
        options["copy_weights"] = model.pretrained_report is not None
    model.roi_heads = HEAD_CLASSES[cfg["HEADS"]].from_torchvision(model.roi_heads, **options)
    return model


def set_thresholds(model, settings):
    """The test-time budgets and thresholds from prediction settings (a dict of infer.py's constants):
    the RPN's proposals (RPN_PROPOSALS), the RoI heads' score threshold, per-class NMS IoU, detections per
    image and their reserve per class (CLASS_RESERVE) and, for the cascade, how many stages score (CASCADE_SCORE_STAGES)."""
    if settings["RPN_PROPOSALS"] < 1:
        raise ValueError(f"RPN_PROPOSALS {settings['RPN_PROPOSALS']}: at least 1")
    if settings["CLASS_RESERVE"] < 0:
        raise ValueError(f"CLASS_RESERVE {settings['CLASS_RESERVE']}: 0 (one global top-k) or more")
    # torchvision's RPN keeps its budgets in these dicts and has no setter for them
    model.rpn._pre_nms_top_n["testing"] = model.rpn._post_nms_top_n["testing"] = int(settings["RPN_PROPOSALS"])
    model.roi_heads.score_thresh = settings["SCORE_THRESHOLD"]
    model.roi_heads.nms_thresh = settings["NMS_THRESHOLD"]
    model.roi_heads.detections_per_img = settings["DETECTIONS_PER_IMAGE"]
    model.roi_heads.class_reserve = int(settings["CLASS_RESERVE"])
    if hasattr(model.roi_heads, "score_stages"):
        stages = len(model.roi_heads.box_heads)
        if not 1 <= settings["CASCADE_SCORE_STAGES"] <= stages:
            raise ValueError(f"CASCADE_SCORE_STAGES {settings['CASCADE_SCORE_STAGES']}: 1 to {stages}")
        model.roi_heads.score_stages = int(settings["CASCADE_SCORE_STAGES"])
    return model


def load_weights(model, ckpt, path="checkpoint", averaged=False):
    """Load a checkpoint's weights; a checkpoint of another backbone, head or class count is refused
    with a message that says which and why. averaged: the EMA weights where the run kept them (what
    validation scored and infer.py predicts with), else the trained weights."""
    state = ckpt.get("ema") if averaged and ckpt.get("ema") is not None else ckpt["model"]
    trained, heads = ckpt["config"].get("BACKBONE"), ckpt["config"].get("HEADS")  # for the message below
    cls = state.get("roi_heads.box_predictor.cls_score.weight", state.get("roi_heads.box_predictors.0.cls_score.weight"))
    if cls is not None and cls.shape[0] != NUM_CLASSES + 1:
        raise CheckpointError(f"{path} predicts {cls.shape[0] - 1} classes, this model {NUM_CLASSES}: "
                              "it was not trained for HW3's four cell classes")
    own = model.state_dict()
    # BatchNorm's batch counters, which only a live BatchNorm keeps, go with the model built, not with the run
    # (a FREEZE_FPN_BN run predicted by a live-FPN rebuild, or the reverse): the statistics load either way
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state},
             **{k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit this model (checkpoint BACKBONE={trained!r}, HEADS={heads!r}; the weights "
                              f"differ in shape or names): {str(e).splitlines()[0]} ...") from None
    return model
