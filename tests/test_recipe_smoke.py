"""The full-size recipe (SE-ResNeXt101 backbone, FPN 256, 512 RoIs, report losses) on the real course sample."""
import torch

import infer
import losses
import predict
import train
from dataset import CellDataset
from model import build_model, set_thresholds

RECIPE = {name: getattr(train, name) for name, _, _ in train.CONFIG}  # train.py's defaults: the recipe


def test_recipe_trains_a_step_and_predicts_in_tiles_on_the_real_sample(sample_dir):
    cfg = dict(RECIPE, PRETRAINED=False, MIN_SIZE=320, MAX_SIZE=400, LOSSES="report", SCALE=0.0,  # small input: CPU
               ROI_BATCH_SIZE=train.AUTO_ROI_BATCH_SIZE["pretrained"])  # the pretrained recipe's 512 RoIs
    assert cfg["BACKBONE"] == "seresnextaa101d_32x8d.sw_in12k_ft_in1k_288"
    torch.manual_seed(0)
    model = build_model(cfg, load_pretrained=False)  # FREEZE_BN auto: live BN
    set_thresholds(model, infer.prediction_settings(DETECTIONS_PER_IMAGE=100))
    image, target = CellDataset(sample_dir, ["course-sample"], sizing=(320, 400, 0.0))[0]
    assert max(image.shape[-2:]) <= 400 and len(target["labels"]) == 161
    model.train()
    loss_dict = model([image], [target])
    assert {"loss_classifier", "loss_box_ciou", "loss_dice", "loss_boundary"} <= set(loss_dict)
    loss = losses.weighted_total(loss_dict, losses.preset_weights("report"))
    loss.backward()
    assert torch.isfinite(loss)
    backbone_grads = [p.grad for p in model.backbone.body.parameters() if p.grad is not None]
    assert backbone_grads and all(torch.isfinite(g).all() for g in backbone_grads)
    model.eval()
    original, _ = CellDataset(sample_dir, ["course-sample"])[0]  # 397 x 482: at x1 it passes 400, so 2 tiles
    opts = predict.predict_options(dict(cfg, SCALE=1.0), infer.prediction_settings(DETECTIONS_PER_IMAGE=100))
    with torch.no_grad():
        out = predict.predict_members([(model, opts)], original)
    records = predict.image_records(out, 1, 0.5, original.shape[-2:])
    assert len(records) == len(out["boxes"]) <= 100
    assert all(r["segmentation"]["size"] == [397, 482] for r in records)
