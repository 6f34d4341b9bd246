"""The detection budget per class (heads.class_budget): the metric counts 100 detections per image AND class,
so a dominant class must not crowd a rare one out, in the RoI heads, the tiles and the TTA fusion alike."""
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

import infer
import predict
from conftest import TINY
from heads import class_budget, select_detections
from model import build_model, set_thresholds


def crowded(n_major=600, n_rare=40):
    """Scores of a dense image: class 2 with n_major detections all above class 3's n_rare."""
    scores = torch.cat([0.5 + 0.5 * torch.rand(n_major), 0.1 + 0.3 * torch.rand(n_rare)])
    labels = torch.cat([torch.full((n_major,), 2), torch.full((n_rare,), 3)])
    return scores, labels


def test_a_rare_class_keeps_its_detections_when_a_dominant_class_fills_the_limit():
    scores, labels = crowded()
    global_topk = scores.argsort(descending=True)[:200]
    assert (labels[global_topk] == 3).sum() == 0  # torchvision's global top-k: the rare class is gone
    keep = class_budget(scores, labels, detections_per_image=200)
    assert len(keep) == 200 and len(set(keep.tolist())) == 200
    assert (labels[keep] == 3).sum() == 40  # every rare detection (under its reserve of 100)
    assert (labels[keep] == 2).sum() == 160  # the rest of the limit: the best of class 2
    assert torch.equal(scores[keep], scores[keep].sort(descending=True).values)  # highest score first
    major = scores[labels == 2].sort(descending=True).values[:160]
    assert torch.equal(scores[keep][labels[keep] == 2], major)


def test_the_reserve_is_the_metrics_100_and_shrinks_to_fit_a_small_limit():
    scores, labels = crowded(n_major=600, n_rare=300)  # both classes over 100
    keep = class_budget(scores, labels, detections_per_image=1000)
    assert len(keep) == 900  # under the limit: everything, in score order
    keep = class_budget(scores, labels, detections_per_image=250)
    assert (labels[keep] == 3).sum() == 100 and (labels[keep] == 2).sum() == 150
    keep = class_budget(scores, labels, detections_per_image=50)  # 50 // 2 classes = 25 each
    assert (labels[keep] == 3).sum() == 25 and (labels[keep] == 2).sum() == 25


def test_under_the_limit_nothing_changes():
    scores, labels = crowded(50, 10)
    assert torch.equal(class_budget(scores, labels, 1000), scores.argsort(descending=True, stable=True))


def test_the_heads_post_processing_is_torchvisions_where_the_budget_does_not_bind():
    torch.manual_seed(0)
    heads = build_model(TINY).roi_heads
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.05, 0.5, 10**5
    proposals = [torch.rand(300, 2) * 100 + torch.tensor([[0.0, 0.0]])]
    proposals = [torch.cat([proposals[0], proposals[0] + 5 + torch.rand(300, 2) * 30], 1)]
    logits, deltas = torch.randn(300, 5) * 2, torch.randn(300, 20) * 0.1
    ours = heads.postprocess_detections(logits, deltas, proposals, [(140, 140)])
    stock = RoIHeads.postprocess_detections(heads, logits, deltas, proposals, [(140, 140)])
    assert len(ours[0][0]) > 100
    for a, b in zip(ours, stock):
        assert torch.equal(a[0], b[0])


def test_reserve_0_is_torchvisions_global_top_k():
    scores, labels = crowded()
    assert torch.equal(class_budget(scores, labels, detections_per_image=200, class_reserve=0), scores.argsort(descending=True)[:200])


@pytest.mark.parametrize("reserve", [100, 0])
def test_the_model_keeps_every_class_within_the_metrics_count(reserve):
    """A model whose class 2 outscores class 4 everywhere still returns class 4's best detections; with
    CLASS_RESERVE 0 it returns torchvision's global top-k, class 2 alone."""
    torch.manual_seed(0)
    settings = infer.prediction_settings(DETECTIONS_PER_IMAGE=40, SCORE_THRESHOLD=0.0, CLASS_RESERVE=reserve)
    model = set_thresholds(build_model(TINY), settings)
    model.eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[:] = torch.tensor([0.0, -5, 5, -5, -1])
        out = model([torch.rand(3, 96, 128)])[0]
    assert len(out["labels"]) == 40
    if reserve:
        assert (out["labels"] == 4).sum() >= 10 and (out["labels"] == 2).sum() >= 10  # 40 // 4 each at least
    else:
        assert (out["labels"] == 2).all()


def test_select_detections_labels_are_the_class_columns():
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])[:, None].expand(2, 4, 4)
    probs = torch.tensor([[0.1, 0.7, 0.0, 0.0], [0.0, 0.0, 0.2, 0.6]])
    out = select_detections(boxes, probs, 0.05, 0.5, 10)
    assert out["labels"].tolist() == [2, 4, 3, 1] and torch.allclose(out["scores"], torch.tensor([0.7, 0.6, 0.2, 0.1]))


def detections(scores, labels):
    n = len(scores)
    i = torch.arange(n, dtype=torch.float32)
    xy = torch.stack([i % 9, i // 9], 1) * 22  # on a grid, apart: nothing suppressed
    return {"boxes": torch.cat([xy, xy + 10], 1), "scores": scores, "labels": labels,
            "mask_probs": torch.ones(n, 1, 28, 28)}


def test_tta_fusion_shares_the_limit_out_by_class():
    scores, labels = crowded(300, 30)
    fused = predict.fuse_detections([detections(scores, labels)], 0.5, detections_per_image=100, class_reserve=100)
    assert len(fused["labels"]) == 100 and (fused["labels"] == 3).sum() == 30
    fused = predict.fuse_detections([detections(scores, labels)], 0.5, detections_per_image=100, class_reserve=0)
    assert (fused["labels"] == 3).sum() == 0


def test_tta_fusion_shares_the_limit_out_on_the_fused_scores():
    """100 cells both passes found (0.6 each: fused 0.6) beat 100 that one pass found at 0.9 (fused 0.45)."""
    labels = torch.ones(200, dtype=torch.int64)
    a = detections(torch.cat([torch.full((100,), 0.6), torch.full((100,), 0.9)]), labels)
    b = predict.subset_detections(a, torch.arange(100))
    b["scores"] = torch.full((100,), 0.6)
    fused = predict.fuse_detections([a, b], 0.5, detections_per_image=100, class_reserve=100)
    assert fused["scores"].tolist() == pytest.approx([0.6] * 100)
    assert sorted(fused["boxes"].round().tolist()) == sorted(a["boxes"][:100].tolist())


class Crowd(torch.nn.Module):
    """Each tile: 60 class-2 detections above 5 class-3 ones, all apart, inside 200 x 200 px."""

    def detect(self, images):  # model.CellMaskRCNN's two steps, which tiled prediction calls
        scores, labels = crowded(60, 5)
        return [{k: v for k, v in detections(scores, labels).items() if k != "mask_probs"}], None

    def segment(self, encoded, dets):
        return [dict(d, mask_probs=torch.ones(len(d["boxes"]), 1, 28, 28)) for d in dets]


@pytest.mark.parametrize("reserve", [100, 0])
def test_tiles_share_the_limit_out_by_class(reserve):
    """CLASS_RESERVE reaches the stitching through predict_image's options (0: the global top-k, class 2 alone)."""
    opts = predict.predict_options({"MIN_SIZE": 0, "MAX_SIZE": 200, "SCALE": 1.0}, infer.prediction_settings(
        DETECTIONS_PER_IMAGE=60, CLASS_RESERVE=reserve, TILE_OVERLAP=0))
    out = predict.predict_image(Crowd(), torch.zeros(3, 400, 400), opts)
    assert len(out["labels"]) == 60 and ((out["labels"] == 3).sum() > 0) == (reserve > 0)
    fused = predict.predict_members([(Crowd(), dict(opts, tta="flips"))], torch.zeros(3, 400, 400))  # and the fusion
    assert len(fused["labels"]) == 60 and ((fused["labels"] == 3).sum() > 0) == (reserve > 0)


def test_where_every_class_reserve_is_inside_the_global_top_k_the_cut_is_torchvisions():
    scores = torch.rand(500)
    labels = torch.randint(1, 5, (500,))
    scores[labels == 4] += 1.0  # class 4 first, then the rest mixed: every class's best 25 fall in the top 300
    keep = class_budget(scores, labels, detections_per_image=300, class_reserve=25)
    assert torch.equal(keep, scores.argsort(descending=True)[:300])


def test_set_thresholds_sets_the_rpn_budget_and_the_cascade_scoring_stages():
    model = set_thresholds(build_model(dict(TINY, HEADS="cascade")),
                           infer.prediction_settings(RPN_PROPOSALS=2500, CASCADE_SCORE_STAGES=2))
    assert model.rpn.pre_nms_top_n() == model.rpn.post_nms_top_n() == 2000  # training: torchvision's, unchanged
    model.eval()
    assert model.rpn.pre_nms_top_n() == 2500 and model.rpn.post_nms_top_n() == 2500
    assert model.roi_heads.score_stages == 2
    for bad in (dict(CASCADE_SCORE_STAGES=4), dict(CASCADE_SCORE_STAGES=0), dict(RPN_PROPOSALS=0),
                dict(CLASS_RESERVE=-1)):
        with pytest.raises(ValueError):
            set_thresholds(model, infer.prediction_settings(**bad))
