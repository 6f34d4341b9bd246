"""BACKBONE = torchvision/maskrcnn_resnet50_fpn_v2: torchvision's COCO Mask R-CNN v2 as the start.

Nothing downloads: the "COCO file" is torchvision's own architecture (91 classes, 3 anchors per
position) filled with recognisable random values. One model built from it serves most tests.
"""
import copy

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops import FrozenBatchNorm2d

import infer
import predict
import train
from conftest import TINY
from model import COCO_MODEL, FPN_BN_MIN_BATCH, PretrainedWeightsError, build_model, load_weights, set_thresholds

LIMIT_20 = infer.prediction_settings(DETECTIONS_PER_IMAGE=20)
COCO = dict(TINY, BACKBONE=COCO_MODEL, FPN_CHANNELS=256, ROI_BATCH_SIZE=32, FREEZE_BN="auto", FREEZE_FPN_BN="auto")
RESET = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.",
         "rpn.head.cls_logits.", "rpn.head.bbox_pred.")


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """(path, state_dict) of a stand-in for torchvision's COCO_V1 file."""
    source = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    state = source.state_dict()
    torch.manual_seed(123)
    for k, v in state.items():
        if v.is_floating_point():  # small values keep a forward pass finite; variances positive
            v.copy_(torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.02)
    path = tmp_path_factory.mktemp("coco") / "coco.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def coco_model(coco_file):
    torch.manual_seed(0)
    return set_thresholds(build_model(dict(COCO, PRETRAINED_WEIGHTS=str(coco_file[0]))), LIMIT_20)


def cells_image():
    """A 96x128 image with three box-shaped cells of classes 1, 2, 4."""
    image = torch.rand(3, 96, 128) * 0.2
    boxes = torch.tensor([[10, 12, 40, 36], [60, 20, 90, 60], [30, 60, 70, 90]])
    masks = torch.zeros(3, 96, 128, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.tolist()):
        m[y0:y1, x0:x1] = 1
        image[:, y0:y1, x0:x1] += 0.6
    return image, {"boxes": boxes.float(), "labels": torch.tensor([1, 2, 4]), "masks": masks}


def test_coco_file_loads_all_but_the_class_and_anchor_layers(coco_file, coco_model):
    _, state = coco_file
    ours = coco_model.state_dict()
    assert set(ours) <= set(state)  # the same architecture: no key of ours the file lacks
    for k, v in ours.items():
        if k.startswith(RESET):  # our shapes, fresh values
            assert not torch.equal(v.flatten()[:10], state[k].flatten()[:10]), k
        else:
            assert torch.equal(v, state[k]), k
    assert ours["roi_heads.box_predictor.cls_score.weight"].shape == (5, 1024)
    assert ours["roi_heads.box_predictor.bbox_pred.weight"].shape == (20, 1024)
    assert ours["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape == (5, 256, 1, 1)
    assert ours["rpn.head.cls_logits.weight"].shape == (6, 256, 1, 1)
    assert ours["rpn.head.bbox_pred.weight"].shape == (24, 256, 1, 1)
    report = coco_model.pretrained_report
    assert str(coco_file[0]) in report and "422 tensors" in report
    for part in ("roi_heads.box_predictor (5 classes, file has 91)", "roi_heads.mask_predictor.mask_fcn_logits",
                 "rpn.head.cls_logits/bbox_pred (6 anchors per position, file has 3)"):
        assert part in report
    # the rest is build_model's, as for timm: anchors, RoIAlign, ImageNet normalisation; every layer trains
    assert coco_model.rpn.anchor_generator.num_anchors_per_location() == [6] * 5
    assert len(coco_model.rpn.head.conv) == 2  # torchvision v2's two-conv RPN head
    assert isinstance(coco_model.roi_heads.box_head, FastRCNNConvFCHead)
    assert isinstance(coco_model.roi_heads.mask_head, MaskRCNNHeads)
    box_pool, mask_pool = coco_model.roi_heads.box_roi_pool, coco_model.roi_heads.mask_roi_pool
    assert (box_pool.output_size, box_pool.sampling_ratio, mask_pool.output_size, mask_pool.sampling_ratio) == \
        ((7, 7), 2, (14, 14), 4)
    assert coco_model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    assert coco_model.transform.image_mean == [0.485, 0.456, 0.406]
    assert coco_model.transform.image_std == [0.229, 0.224, 0.225]
    assert all(p.requires_grad for p in coco_model.parameters())


def _bn(module):
    mods = list(module.modules())
    return (any(isinstance(m, FrozenBatchNorm2d) for m in mods), any(isinstance(m, torch.nn.BatchNorm2d) for m in mods))


def test_freeze_bn_freezes_the_resnet_body_and_the_fpn_at_a_small_batch(coco_file, coco_model):
    """At batch 1 the FPN's BatchNorm would learn from one image a step and predict with running averages:
    frozen with the body, at the file's statistics. The RoI heads' BatchNorm sees hundreds of RoIs: live."""
    assert _bn(coco_model.backbone.body) == (True, False)
    assert _bn(coco_model.backbone.fpn) == (True, False)
    fpn_bn = [k for k in coco_file[1] if k.startswith("backbone.fpn.") and k.endswith("running_mean")]
    assert fpn_bn and all(torch.equal(coco_model.state_dict()[k], coco_file[1][k]) for k in fpn_bn)
    for head in (coco_model.roi_heads.box_head, coco_model.roi_heads.mask_head):
        assert _bn(head) == (False, True)  # hundreds of RoIs a step: their statistics learn
    big_batch = build_model(dict(COCO, PRETRAINED_WEIGHTS=str(coco_file[0]), BATCH_SIZE=FPN_BN_MIN_BATCH))
    assert _bn(big_batch.backbone.fpn) == (False, True) and _bn(big_batch.backbone.body) == (True, False)
    kept_live = build_model(dict(COCO, PRETRAINED_WEIGHTS=str(coco_file[0]), FREEZE_FPN_BN=False))
    assert _bn(kept_live.backbone.fpn) == (False, True)
    scratch = build_model(dict(COCO, PRETRAINED=False))
    assert scratch.pretrained_report is None and _bn(scratch) == (False, True)


def test_freeze_fpn_bn_resolves_once():
    """train.py resolves FREEZE_FPN_BN into the run's configuration once (a resume keeps it)."""
    cfg = dict(COCO, PRETRAINED_WEIGHTS="coco.pth", BATCH_SIZE=1, LR="auto", FREEZE_FPN_BN="auto")
    assert train.resolve_training_defaults(dict(cfg))["FREEZE_FPN_BN"] is True
    assert train.resolve_training_defaults(dict(cfg, BATCH_SIZE=8))["FREEZE_FPN_BN"] is False
    assert train.resolve_training_defaults(dict(cfg, FREEZE_BN=False))["FREEZE_FPN_BN"] is False


def test_a_checkpoint_trained_with_a_live_fpn_batchnorm_loads_into_the_frozen_one(coco_file, coco_model):
    live = build_model(dict(COCO, PRETRAINED_WEIGHTS=str(coco_file[0]), BATCH_SIZE=FPN_BN_MIN_BATCH))
    ckpt = {"model": live.state_dict(), "config": dict(COCO, BATCH_SIZE=FPN_BN_MIN_BATCH)}
    assert any(k.startswith("backbone.fpn.") and k.endswith("num_batches_tracked") for k in ckpt["model"])
    frozen = build_model(dict(COCO, PRETRAINED=False, FREEZE_BN=True), load_pretrained=False)
    load_weights(frozen, ckpt)
    assert torch.equal(frozen.state_dict()["backbone.fpn.inner_blocks.0.1.running_mean"],
                       ckpt["model"]["backbone.fpn.inner_blocks.0.1.running_mean"])


def test_a_wrong_coco_file_is_refused(coco_file, tmp_path):
    path, state = coco_file
    missing = {k: v for k, v in state.items() if k != "backbone.body.layer1.0.conv1.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(PretrainedWeightsError, match="missing 1: backbone.body.layer1.0.conv1.weight"):
        build_model(dict(COCO, PRETRAINED_WEIGHTS=str(tmp_path / "missing.pth")))
    torch.save({"model": {**state, "roi_heads.extra.weight": torch.zeros(3)}}, tmp_path / "extra.pth")
    with pytest.raises(PretrainedWeightsError, match="unexpected 1: roi_heads.extra.weight"):
        build_model(dict(COCO, PRETRAINED_WEIGHTS=str(tmp_path / "extra.pth")))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_model(dict(COCO, PRETRAINED_WEIGHTS=str(tmp_path / "absent.pth")))


def test_hub_offline_says_what_to_do_and_never_starts_random(monkeypatch, tmp_path):
    import torchvision.models._api
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise OSError("no internet")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)  # what get_state_dict calls
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError, match=r"https://.*\.pth.*PRETRAINED_WEIGHTS.*--pretrained false"):
        build_model(dict(COCO, PRETRAINED=True))
    assert len(calls) == 1 and calls[0].endswith(".pth")


def test_coco_model_trains_a_step_and_infer_rebuilds_it_from_a_checkpoint(coco_file, coco_model, tmp_path):
    from utils import CHECKPOINT_FORMAT, save_checkpoint
    torch.manual_seed(0)
    model = copy.deepcopy(coco_model).train()
    image, target = cells_image()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_dict = model([image], [target])
    assert all(torch.isfinite(v) for v in loss_dict.values()), loss_dict
    opt.zero_grad()
    sum(loss_dict.values()).backward()
    opt.step()
    # the checkpoint's config names a file that is gone: load_pretrained=False must not look for it
    config = dict(COCO, PRETRAINED=True, PRETRAINED_WEIGHTS=str(tmp_path / "gone.pth"))
    save_checkpoint({"model": model.state_dict(), "config": config, "format": CHECKPOINT_FORMAT}, tmp_path / "best.pt")
    rebuilt, _ = predict.load_model(tmp_path / "best.pt", torch.device("cpu"), infer.prediction_settings(DETECTIONS_PER_IMAGE=20))
    trained = model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in rebuilt.state_dict().items())
    rebuilt.rpn._post_nms_top_n["testing"] = 100  # CPU time: the 4-conv box head on 1000 proposals takes seconds
    with torch.no_grad():
        out = rebuilt([image])[0]
    assert set(out) == {"boxes", "scores", "labels", "mask_probs"}
    n = len(out["boxes"])
    assert 0 < n <= 20 and out["mask_probs"].shape == (n, 1, 28, 28)


def test_coco_model_refuses_another_fpn_width():
    with pytest.raises(ValueError, match="256 FPN channels: set FPN_CHANNELS 256 \\(it is 32\\)"):
        build_model(dict(COCO, FPN_CHANNELS=32))


def test_cascade_on_the_coco_start_begins_every_stage_from_the_coco_box_head(coco_file):
    _, state = coco_file
    torch.manual_seed(0)
    model = set_thresholds(build_model(dict(COCO, HEADS="cascade", PRETRAINED_WEIGHTS=str(coco_file[0]))), LIMIT_20)
    ours = model.state_dict()
    file_head = {k[len("roi_heads.box_head."):]: v for k, v in state.items() if k.startswith("roi_heads.box_head.")}
    assert file_head
    for s in range(3):
        for k, v in file_head.items():
            assert torch.equal(ours[f"roi_heads.box_heads.{s}.{k}"], v), (s, k)
    assert ours["roi_heads.box_predictors.2.bbox_pred.weight"].shape[0] == 4  # class-agnostic, fresh
