"""Prediction that runs out of GPU memory (retried in smaller tiles, then an error naming the image), and
infer.py's log beside what it writes."""
import json

import pytest
import torch

import infer
import predict
from conftest import TINY
from dataset import CellDataset, TestDataset, list_train_ids
from model import build_model, set_thresholds
from utils import CHECKPOINT_FORMAT

SETTINGS = infer.prediction_settings(SCORE_THRESHOLD=0.0, DETECTIONS_PER_IMAGE=50)  # an untrained model finds some


def oom(*_, **__):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 15 GiB. test")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return set_thresholds(build_model(TINY), SETTINGS).eval()


def test_an_image_out_of_memory_is_predicted_again_in_smaller_tiles(tiny, demo_dir, monkeypatch, capsys):
    data = CellDataset(demo_dir, list_train_ids(demo_dir)[:2], train=False)
    opts = predict.predict_options(TINY, SETTINGS)
    before = predict.predict_dataset(tiny, data, "cpu", opts)
    image, _ = data[0]
    factor, tile = predict.tiling(image, opts)
    assert tile is None  # the whole image in one forward, as trained
    calls = {"forward": 0, "inputs": []}
    forward, detect = tiny.forward, tiny.detect

    def first_forward_fails(images, *args):
        calls["forward"] += 1
        return oom() if calls["forward"] == 1 else forward(images, *args)

    def detect_spy(images):
        calls["inputs"].append(max(images[0].shape[-2:]))
        return detect(images)
    monkeypatch.setattr(tiny, "forward", first_forward_fails)
    monkeypatch.setattr(tiny, "detect", detect_spy)
    raw = predict.predict_dataset(tiny, data, "cpu", opts)
    out = capsys.readouterr().out
    assert [r[0] for r in raw] == [0, 1] and raw[0][1] == tuple(image.shape[-2:])
    side = max(image.shape[-2:])
    assert out.count("retrying in tiles") == 1 and data.ids[0] in out and f"tiles of {side // 2} px" in out
    # the retry: tiles half the image's side, at the same resize factor, so inputs half the one that failed
    assert len(calls["inputs"]) > 1 and max(calls["inputs"]) <= round(side / 2 * factor) + 1
    again = predict.predict_image(tiny, image, dict(opts, shrink=2, mask_chunk=predict.OOM_MASK_CHUNK))
    assert len(raw[0][2]["boxes"]) > 0 and torch.equal(raw[0][2]["boxes"], again["boxes"])
    assert torch.equal(raw[1][2]["boxes"], before[1][2]["boxes"])  # the next image: whole, as without the error


def test_an_image_out_of_memory_in_every_retry_is_named(tiny, demo_dir, monkeypatch, capsys):
    data = TestDataset(demo_dir)
    rec = data.table[0]
    freed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the cache is emptied where CUDA is
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))
    monkeypatch.setattr(tiny, "forward", oom)
    monkeypatch.setattr(tiny, "detect", oom)
    with pytest.raises(predict.PredictionMemoryError) as error:
        predict.predict_dataset(tiny, data, "cpu", predict.predict_options(TINY, SETTINGS))
    message = str(error.value)
    assert f"image {rec['file_name']} (id {rec['id']}), {rec['height']}x{rec['width']} px" in message
    assert "Tried to allocate 2.00 GiB" in message  # what CUDA said
    assert all(s in message for s in ("--detections-per-image", "--input-scale", "--max-size"))
    assert isinstance(error.value, torch.cuda.OutOfMemoryError)  # what callers catching OOM still catch
    retries = [line for line in capsys.readouterr().out.splitlines() if "retrying" in line]
    side = max(rec["height"], rec["width"])
    assert [f"tiles of {side // d} px" in line for line, d in zip(retries, predict.OOM_TILE_DIVISORS)] == [True] * 2
    assert len(retries) == len(predict.OOM_TILE_DIVISORS) and len(freed) == len(retries) + 1


def test_mask_head_in_chunks_gives_the_same_masks(tiny, demo_dir, monkeypatch):
    image, _ = CellDataset(demo_dir, list_train_ids(demo_dir)[:1], train=False)[0]
    whole = predict.predict_tiled(tiny, image, 1.0, 40, 8, 0.5, detections_per_image=50, class_reserve=100)
    sizes, segment = [], tiny.segment
    monkeypatch.setattr(tiny, "segment", lambda enc, dets: sizes.append(len(dets[0]["boxes"])) or segment(enc, dets))
    chunked = predict.predict_tiled(tiny, image, 1.0, 40, 8, 0.5, detections_per_image=50, class_reserve=100, mask_chunk=3)
    assert len(whole["boxes"]) > 3 and max(sizes) == 3 and sum(sizes) == len(whole["boxes"])
    assert torch.equal(chunked["boxes"], whole["boxes"])
    assert torch.allclose(chunked["mask_probs"], whole["mask_probs"], atol=1e-6)


@pytest.fixture
def checkpoint(tiny, demo_dir, tmp_path):
    """A checkpoint of the untrained tiny model, as train.py writes one (no training: the log is tested)."""
    ids = list_train_ids(demo_dir)
    path = tmp_path / "run" / "best.pt"
    path.parent.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "model": tiny.state_dict(), "config": {**TINY, "DATA_DIR": str(demo_dir)},
                "epoch": 1, "train_ids": ids[2:], "val_ids": ids[:2]}, path)
    return path


def test_infer_logs_what_it_prints_beside_what_it_writes(checkpoint, demo_dir, tmp_path):
    args = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--detections-per-image", "20"]
    sub = tmp_path / "sub" / "test-results.json"
    infer.main(args + ["--output-json", str(sub)])
    log = (sub.parent / "infer.log").read_text()
    assert f"checkpoint {checkpoint}" in log and f"wrote {sub}" in log and "\r" not in log  # no progress bars
    infer.main(args + ["--eval"])
    assert "val images 2, detections" in (checkpoint.parent / "infer.log").read_text()
    infer.main(args + ["--checkpoint", f"{checkpoint},{checkpoint}", "--sweep"])
    ensemble = checkpoint.parent / "ensemble"
    assert "an ensemble of 2" in (ensemble / "infer.log").read_text() and (ensemble / "sweep.csv").is_file()
    infer.main(args + ["--output-json", str(sub)])  # appended, one header line a run
    assert (sub.parent / "infer.log").read_text().count("infer.py --checkpoint") == 2


def test_infer_log_ends_with_the_error_that_stopped_it(checkpoint, demo_dir, tmp_path, monkeypatch):
    args = ["--checkpoint", str(checkpoint), "--num-workers", "0", "--output-json", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit, match="choose none, flips"):
        infer.main(args + ["--tta", "mirror"])
    assert (tmp_path / "infer.log").read_text().splitlines()[-1].startswith("error: TTA 'mirror'")
    table = json.loads((demo_dir / "test_image_name_to_ids.json").read_text())
    monkeypatch.setattr(predict, "predict_members", oom)
    with pytest.raises(predict.PredictionMemoryError):
        infer.main(args)
    last = (tmp_path / "infer.log").read_text().splitlines()[-1]  # as `python infer.py` ends: 'error: ...'
    assert last.startswith(f"error: image {table[0]['file_name']} (id {table[0]['id']})")
