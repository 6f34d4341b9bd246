import pytest
import timm
import torch
from torchvision.ops import FrozenBatchNorm2d

from conftest import SIZING, TINY
from dataset import CellDataset, list_train_ids
import infer
from model import PretrainedWeightsError, build_model, set_thresholds


def test_tiny_model_trains_a_step_and_predicts(demo_dir):
    torch.manual_seed(0)
    model = set_thresholds(build_model(TINY), infer.prediction_settings(DETECTIONS_PER_IMAGE=50))
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
    set_thresholds(model, infer.prediction_settings())  # the recipe's inference: infer.py's constants
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == (0.05, 0.5, 1000)
    model.eval()
    assert model.rpn.pre_nms_top_n() == model.rpn.post_nms_top_n() == infer.RPN_PROPOSALS == 2000


def test_images_are_normalised_exactly_once_with_the_backbone_stats():
    model = build_model(TINY).eval()
    cfg = timm.create_model(TINY["BACKBONE"]).pretrained_cfg
    assert model.transform.image_mean == list(cfg["mean"]) and model.transform.image_std == list(cfg["std"])
    image = torch.rand(3, 96, 96)
    batch, _ = model.transform([image])
    expected = (image - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    assert torch.allclose(batch.tensors[0, :, :96, :96], expected, atol=1e-5)


def _bn_kinds(model):
    mods = list(model.backbone.body.modules())
    return (any(isinstance(m, FrozenBatchNorm2d) for m in mods),
            any(isinstance(m, torch.nn.BatchNorm2d) for m in mods))


def test_freeze_bn_auto_freezes_pretrained_and_keeps_a_random_backbone_live(tmp_path):
    from safetensors.torch import save_file
    from model import freeze_bn_setting
    path = tmp_path / "weights.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    pretrained = dict(TINY, FREEZE_BN="auto", PRETRAINED_WEIGHTS=str(path))
    assert _bn_kinds(build_model(pretrained)) == (True, False)
    # the same architecture when a checkpoint is loaded over it (infer.py: load_pretrained=False)
    assert _bn_kinds(build_model(pretrained, load_pretrained=False)) == (True, False)
    scratch = dict(TINY, FREEZE_BN="auto", PRETRAINED=False, PRETRAINED_WEIGHTS="")
    assert _bn_kinds(build_model(scratch)) == (False, True)
    assert "random backbone" in freeze_bn_setting(scratch)[1] and "pretrained" in freeze_bn_setting(pretrained)[1]
    # true/false force it
    assert _bn_kinds(build_model(dict(pretrained, FREEZE_BN=False))) == (False, True)
    assert _bn_kinds(build_model(dict(scratch, FREEZE_BN="true"), load_pretrained=False)) == (True, False)


def test_live_batchnorm_on_a_random_backbone_learns():
    """Frozen, timm's zero-initialised last BatchNorm of each residual block never moves: the blocks'
    residual branches stay silent. Live (auto from scratch) its weight gets a gradient and moves."""
    torch.manual_seed(0)
    model = build_model(dict(TINY, FREEZE_BN="auto"))
    last_bn = model.backbone.body.layer1[0].bn2
    assert isinstance(last_bn, torch.nn.BatchNorm2d) and torch.all(last_bn.weight == 0)  # timm's zero init
    model.train()
    image = torch.rand(3, 96, 96)
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 96, 96, dtype=torch.uint8)}
    target["masks"][0, 10:40, 10:40] = 1
    sum(model([image], [target]).values()).backward()
    assert last_bn.weight.grad is not None and last_bn.weight.grad.abs().sum() > 0


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


def test_training_defaults_follow_the_backbone_start_or_refuse(tmp_path):
    import train
    run = ["--run-dir", str(tmp_path / "r")]
    cfg, _ = train.resolve_config(run + ["--pretrained", "false"])
    assert cfg["FREEZE_BN"] == "auto" and cfg["LR"] == train.AUTO_LR["scratch"] == 2e-4
    assert cfg["SCALE"] == train.AUTO_SCALE["scratch"] == 1.0  # from scratch: every cell at its own size
    assert cfg["ROI_BATCH_SIZE"] == train.AUTO_ROI_BATCH_SIZE["scratch"] == 128  # from scratch: more steps
    cfg, _ = train.resolve_config(run + ["--pretrained", "true"])
    assert cfg["LR"] == train.AUTO_LR["pretrained"] == 5e-5
    assert cfg["SCALE"] == train.AUTO_SCALE["pretrained"] == 0.0  # the recipe's MIN_SIZE/MAX_SIZE sizing
    assert cfg["ROI_BATCH_SIZE"] == train.AUTO_ROI_BATCH_SIZE["pretrained"] == 512  # torchvision's, the recipe's
    cfg, _ = train.resolve_config(run + ["--pretrained-weights", "w.safetensors", "--pretrained", "false"])
    assert cfg["SCALE"] == 0.0  # a local weights file is a pretrained start too
    cfg, _ = train.resolve_config(run + ["--pretrained", "false", "--lr", "1e-3", "--freeze-bn", "false",
                                         "--scale", "0"])
    assert cfg["LR"] == 1e-3 and cfg["FREEZE_BN"] is False and cfg["SCALE"] == 0.0
    cfg, _ = train.resolve_config(run + ["--pretrained", "true", "--scale", "2", "--roi-batch-size", "256"])
    assert cfg["SCALE"] == 2.0 and cfg["ROI_BATCH_SIZE"] == 256
    cfg, _ = train.resolve_config(run + ["--roi-batch-size", "4"])
    assert cfg["ROI_BATCH_SIZE"] == 4  # the fewest that samples a cell (int(0.25 x 4) = 1)
    for bad in ("many", "0", "3", "1.5", "\u00b2"):  # 3: torchvision samples int(0.75) = 0 cells; '²' passes isdigit
        with pytest.raises(SystemExit, match=f"--roi-batch-size '{bad}': a whole number"):
            train.resolve_config(run + ["--roi-batch-size", bad])
    cfg, _ = train.resolve_config(run + ["--demo", "true"])
    assert cfg["SCALE"] == 1.0  # the demo trains from scratch
    with pytest.raises(SystemExit, match="a number or auto"):
        train.resolve_config(run + ["--scale", "big"])
    with pytest.raises(SystemExit, match="--scale -1: a factor > 0"):
        train.resolve_config(run + ["--scale", "-1"])
    with pytest.raises(SystemExit, match="--freeze-bn auto"):
        train.resolve_config(run + ["--pretrained", "false", "--freeze-bn", "true"])
    with pytest.raises(SystemExit, match="auto, true or false"):
        train.resolve_config(run + ["--freeze-bn", "sometimes"])
    with pytest.raises(SystemExit, match="a number or auto"):
        train.resolve_config(run + ["--lr", "fast"])


def test_a_seed_gives_the_initial_weights_of_torchvisions_own_constructor():
    """build_model makes its parts in the order MaskRCNN's constructor draws them: the same seed gives the
    same initial weights as torchvision's defaults (and as every run before the model was built in parts)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    from model import ANCHOR_SIZES, ASPECT_RATIOS, TimmFPN, create_timm_features
    torch.manual_seed(0)
    ours = build_model(TINY).state_dict()
    torch.manual_seed(0)
    stock = MaskRCNN(TimmFPN(create_timm_features(TINY["BACKBONE"]), TINY["FPN_CHANNELS"]), num_classes=5,
                     rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, (ASPECT_RATIOS,) * len(ANCHOR_SIZES)),
                     box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
                     mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 4)).state_dict()
    assert list(ours) == list(stock)
    assert all(torch.equal(ours[k], stock[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], stock[k])]
