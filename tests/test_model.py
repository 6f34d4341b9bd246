import pytest
import timm
import torch
from torchvision.ops import FrozenBatchNorm2d

from conftest import SIZING, TINY
from dataset import CellDataset, list_train_ids
from model import PretrainedWeightsError, build_model


def test_tiny_model_trains_a_step_and_predicts(demo_dir):
    torch.manual_seed(0)
    model = build_model(TINY, detections_per_image=50)
    ds = CellDataset(demo_dir, list_train_ids(demo_dir)[:2], train=True, sizing=SIZING)
    (im0, t0), (im1, _) = ds[0], ds[1]
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
             "masks": torch.zeros((0,) + im1.shape[1:], dtype=torch.uint8), "image_id": 1}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_dict = model([im0, im1], [t0, empty])  # one image without any instance
    assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(loss_dict.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        out = model([im0])[0]
    n = len(out["boxes"])
    assert n <= 50 and out["mask_probs"].shape == (n, 1, 28, 28) and ((out["labels"] >= 1) & (out["labels"] <= 4)).all()


def test_report_architecture():
    cfg = dict(TINY, FPN_CHANNELS=256, ROI_BATCH_SIZE=512)
    model = build_model(cfg)
    ag = model.rpn.anchor_generator
    assert ag.sizes == ((4, 8), (16, 32), (32, 64), (64, 128), (128, 256))
    assert all(r == (0.5, 1.0, 2.0) for r in ag.aspect_ratios)
    assert model.rpn.head.cls_logits.out_channels == 6
    box_pool, mask_pool = model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool
    assert (box_pool.output_size, box_pool.sampling_ratio) == ((7, 7), 2)
    assert (mask_pool.output_size, mask_pool.sampling_ratio) == ((14, 14), 4)
    assert box_pool.featmap_names == mask_pool.featmap_names == ["0", "1", "2", "3"]
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]  # strides 4..64
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == (0.05, 0.5, 1000)


def test_images_are_normalised_exactly_once_with_the_backbone_stats():
    model = build_model(TINY).eval()
    cfg = timm.create_model(TINY["BACKBONE"]).pretrained_cfg
    assert model.transform.image_mean == list(cfg["mean"]) and model.transform.image_std == list(cfg["std"])
    image = torch.rand(3, 96, 96)
    batch, _ = model.transform([image])
    expected = (image - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    assert torch.allclose(batch.tensors[0, :, :96, :96], expected, atol=1e-5)


def test_batchnorm_frozen_by_default_and_optional():
    frozen = build_model(dict(TINY, FREEZE_BN=True, PRETRAINED_WEIGHTS="unused-path"), load_pretrained=False)
    bns = [m for m in frozen.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not bns and any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.body.modules())
    live = build_model(dict(TINY, FREEZE_BN=False))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in live.backbone.body.modules())


def test_pretrained_download_failure_says_what_to_do():
    with pytest.raises(PretrainedWeightsError, match="PRETRAINED_WEIGHTS.*--pretrained false"):
        build_model(dict(TINY, BACKBONE="resnet18", PRETRAINED=True))


def test_local_pretrained_weights_file_is_loaded(tmp_path):
    from safetensors.torch import save_file
    source = timm.create_model("test_resnet")
    torch.nn.init.normal_(source.conv1[0].weight)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model(dict(TINY, PRETRAINED=False, PRETRAINED_WEIGHTS=str(path)))
    assert torch.equal(model.backbone.body.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_model(dict(TINY, PRETRAINED_WEIGHTS=str(tmp_path / "missing.pth")))
