"""Behaviour kept through refactors: tests/reference_tiny.json was written by the repo at commit 9d6ad0e (before
issue 31's clean-up) from TINY at seed 0: the state_dict keys, a SHA-256 of the initial weights, and the
submission records of the 3 demo test images predicted with those weights (50 detections an image). Today's
code must give the same."""
import hashlib
import json

import pytest
import torch

import infer
import predict
from conftest import ROOT, TINY
from dataset import TestDataset, make_demo_data
from model import build_model, set_thresholds

REFERENCE = json.loads((ROOT / "tests" / "reference_tiny.json").read_text())


def test_same_initial_weights_keys_and_predictions_as_before_the_clean_up(tmp_path):
    torch.manual_seed(REFERENCE["seed"])
    model = build_model(dict(TINY), load_pretrained=False)
    state = model.state_dict()
    assert sorted(state) == REFERENCE["state_dict_keys"]
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].detach().float().numpy().tobytes())
    assert digest.hexdigest() == REFERENCE["initial_weights_sha256"]
    settings = infer.prediction_settings(**REFERENCE["settings"])
    set_thresholds(model, settings)
    data = make_demo_data(tmp_path / "demo", n_train=2, n_test=3, size_range=(64, 96), seed=1)
    raw = predict.predict_dataset(model.eval(), TestDataset(data), "cpu", predict.predict_options(TINY, settings))
    records = predict.to_records(raw, settings["MASK_THRESHOLD"])
    expected = REFERENCE["records"]
    assert len(records) == len(expected) > 100
    for r, e in zip(records, expected):
        assert (r["image_id"], r["category_id"]) == (e["image_id"], e["category_id"])
        assert r["score"] == pytest.approx(e["score"], abs=2e-5) and r["bbox"] == pytest.approx(e["bbox"], abs=2e-3)
        assert hashlib.sha256(r["segmentation"]["counts"].encode()).hexdigest()[:16] == e["rle_sha256"]
