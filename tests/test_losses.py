import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import complete_box_iou_loss

import infer
import losses
from heads import PresetRoIHeads
from conftest import SIZING, TINY
from dataset import CellDataset, list_train_ids
from model import build_model, set_thresholds
import predict


def test_focal_with_gamma_0_alpha_half_is_half_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(64, 5), torch.randint(0, 5, (64,))
    assert torch.allclose(losses.focal_loss(logits, labels, alpha=0.5, gamma=0.0), 0.5 * F.cross_entropy(logits, labels))


def test_focal_down_weights_easy_examples():
    labels = torch.tensor([2, 2])
    logits = torch.tensor([[0, 0, 6.0, 0, 0], [0, 0, 0.5, 0, 0]])  # easy, hard
    per = [losses.focal_loss(logits[i:i + 1], labels[i:i + 1], alpha=1, gamma=2) for i in range(2)]
    ce = [F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(2)]
    assert per[0] / ce[0] < 0.01 < per[1] / ce[1]  # the easy one loses almost all its weight
    assert per[1] / ce[1] > 0.3


def test_focal_alpha_t_is_alpha_on_cells_and_one_minus_alpha_on_background():
    """Lin et al.: alpha_t = alpha for a cell RoI, 1 - alpha for a background RoI (0.25 : 0.75 = 1:3)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    cells, background = torch.tensor([1, 2, 3, 4, 2, 1]), torch.zeros(6, dtype=torch.int64)
    for alpha in (0.25, 0.6):
        assert torch.allclose(losses.focal_loss(logits, cells, alpha=alpha, gamma=0),
                              alpha * F.cross_entropy(logits, cells))
        assert torch.allclose(losses.focal_loss(logits, background, alpha=alpha, gamma=0),
                              (1 - alpha) * F.cross_entropy(logits, background))
    # mixed: normalised by all sampled RoIs, each weighted by its own alpha_t
    labels = torch.tensor([0, 0, 0, 2, 0, 1])
    per = F.cross_entropy(logits, labels, reduction="none")
    expected = (torch.where(labels > 0, 0.25, 0.75) * per).sum() / 6
    assert torch.allclose(losses.focal_loss(logits, labels, alpha=0.25, gamma=0), expected)


def test_ciou_zero_for_identical_boxes_and_matches_torchvision_on_decoded_boxes():
    boxes = torch.tensor([[10.0, 10, 30, 40], [5, 5, 9, 9]])
    assert complete_box_iou_loss(boxes, boxes, reduction="sum").abs() < 1e-6
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = torch.tensor([[8.0, 12, 28, 35], [4, 6, 10, 10]])
    targets = coder.encode_single(boxes, proposals)
    deltas = targets + 0.1 * torch.randn_like(targets)
    expected = complete_box_iou_loss(coder.decode_single(deltas, proposals), boxes, reduction="sum")
    ours = complete_box_iou_loss(coder.decode_single(deltas, proposals), coder.decode_single(targets, proposals),
                                 reduction="sum")
    assert torch.allclose(ours, expected, atol=1e-4)


def test_dice_of_a_perfect_mask_is_about_zero():
    target = torch.zeros(1, 28, 28)
    target[0, 5:20, 8:22] = 1
    perfect_logits = (target * 2 - 1) * 30
    assert losses.dice_loss(perfect_logits, target) < 1e-3
    assert losses.dice_loss(-perfect_logits, target) > 0.9


def test_signed_distance_matches_scipy():
    rng = np.random.default_rng(0)
    masks = ndimage.gaussian_filter(rng.random((6, 28, 28)), (0, 2, 2)) > 0.5
    masks[0] = False
    masks[1] = True  # no boundary: both give 0
    phi = losses.signed_distance(torch.from_numpy(masks).float()).numpy()
    for m, p in zip(masks, phi):
        if m.any() and (~m).any():
            expected = ndimage.distance_transform_edt(~m) * ~m - (ndimage.distance_transform_edt(m) - 1) * m
        else:
            expected = np.zeros_like(p)
        assert np.allclose(p, expected, atol=1e-4)


def test_boundary_loss_is_lowest_for_the_ground_truth_mask():
    target = torch.zeros(1, 28, 28)
    target[0, 6:22, 6:20] = 1
    gt = losses.boundary_loss((target * 2 - 1) * 30, target)
    for shift in (1, 3):
        shifted = torch.roll(target, shift, dims=2)
        assert losses.boundary_loss((shifted * 2 - 1) * 30, target) > gt
    assert losses.boundary_loss((target * 2 - 1) * 30 - 60, target) > gt  # empty prediction
    assert losses.boundary_loss(torch.full_like(target, 30.0), target) > gt  # everything foreground


@pytest.mark.parametrize("fill", ["empty", "one_pixel", "full"])
def test_mask_loss_gradients_finite_for_empty_and_tiny_masks(fill):
    target = torch.zeros(3, 28, 28)
    if fill == "one_pixel":
        target[:, 14, 14] = 1
    elif fill == "full":
        target[:] = 1
    logits = torch.randn(3, 28, 28, requires_grad=True)
    total = losses.dice_loss(logits, target) + losses.boundary_loss(logits, target)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("preset", list(losses.PRESETS))
def test_each_preset_trains_a_step_then_predicts(demo_dir, preset):
    torch.manual_seed(0)
    model = set_thresholds(build_model(dict(TINY, LOSSES=preset)), infer.prediction_settings(DETECTIONS_PER_IMAGE=20))
    ds = CellDataset(demo_dir, list_train_ids(demo_dir)[:1], train=False, sizing=SIZING)
    image, target = ds[0]
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
             "masks": torch.zeros((0,) + image.shape[1:], dtype=torch.uint8), "image_id": 1}
    weights = losses.preset_weights(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for targets in ([target], [empty]):
        loss_dict = model([image], targets)
        expected = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        if preset != "stock":
            expected |= {"loss_box_ciou", "loss_dice", "loss_boundary"}
        assert set(loss_dict) == expected
        loss = losses.weighted_total(loss_dict, weights)
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model([image])[0]
    assert len(out["boxes"]) <= 20 and out["mask_probs"].shape[1:] == (1, 28, 28)


def test_report_presets_add_their_terms_as_the_report_composes_them():
    """box = 0.5 x smooth-L1 + w x CIoU, mask = (BCE + Dice + 0.1 x boundary) / 3, classification =
    2.5 x focal for report (cross-entropy x1 for ciou_dice_boundary); the RPN terms stay stock."""
    torch.manual_seed(0)
    model = build_model(dict(TINY, LOSSES="report"))
    assert model.roi_heads.classification == "focal" and model.roi_heads.preset == "report"
    terms = {name: torch.tensor(float(i + 1)) for i, name in enumerate(losses.LOSS_TERMS)}
    t = {k: float(v) for k, v in terms.items()}
    w = losses.CIOU_WEIGHT
    rpn = t["loss_objectness"] + t["loss_rpn_box_reg"]
    box = 0.5 * t["loss_box_reg"] + w * t["loss_box_ciou"]
    mask = (t["loss_mask"] + t["loss_dice"] + 0.1 * t["loss_boundary"]) / 3
    assert float(losses.weighted_total(terms, losses.preset_weights("report"))) == pytest.approx(
        2.5 * t["loss_classifier"] + box + mask + rpn)
    assert float(losses.weighted_total(terms, losses.preset_weights("ciou_dice_boundary"))) == pytest.approx(
        t["loss_classifier"] + box + mask + rpn)
    assert float(losses.weighted_total(terms, losses.preset_weights("stock"))) == pytest.approx(
        t["loss_classifier"] + t["loss_box_reg"] + t["loss_mask"] + rpn)
    for preset in ("report", "ciou_dice_boundary"):  # additive: no stock term weighs 0
        assert all(losses.preset_weights(preset)[k] > 0 for k in losses.PRESETS["stock"][1])
    assert losses.preset_weights("report", {"loss_box_ciou": 5})["loss_box_ciou"] == 5.0
    with pytest.raises(ValueError, match="unknown loss terms"):
        losses.preset_weights("report", {"loss_focal": 1})
    with pytest.raises(ValueError, match="not a known preset"):
        build_model(dict(TINY, LOSSES="fancy"))


def test_preset_survives_the_checkpoint_round_trip(tmp_path, demo_dir):
    import infer
    from utils import CHECKPOINT_FORMAT, save_checkpoint
    cfg = dict(TINY, LOSSES="report", LOSS_WEIGHTS={"loss_boundary": 0.5})
    model = build_model(cfg)
    save_checkpoint({"model": model.state_dict(), "config": cfg, "format": CHECKPOINT_FORMAT}, tmp_path / "best.pt")
    loaded, ckpt = predict.load_model(tmp_path / "best.pt", "cpu", infer.prediction_settings(DETECTIONS_PER_IMAGE=10))
    assert isinstance(loaded.roi_heads, PresetRoIHeads) and loaded.roi_heads.classification == "focal"
    assert ckpt["config"]["LOSS_WEIGHTS"] == {"loss_boundary": 0.5}
    image, target = CellDataset(demo_dir, list_train_ids(demo_dir)[:1], sizing=SIZING)[0]
    with torch.no_grad():
        assert len(loaded([image])[0]["boxes"]) <= 10
    loaded.train()
    assert "loss_boundary" in loaded([image], [target])
