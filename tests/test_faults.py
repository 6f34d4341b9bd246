"""Bad input and faults: every case gets a clear error naming the file, and no finished work is lost."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch

import engine
import infer
import predict
import train
from conftest import ROOT, SIZING, TINY, write_sample
from dataset import (CellDataset, DataError, TestDataset, check_train_data, list_train_ids, read_image,
                     read_label_maps, read_test_table)
from model import build_model, load_weights
from utils import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint, save_json


def blob(shape=(24, 30), ids=((5, 5, 1),)):
    lab = np.zeros(shape)
    for y, x, i in ids:
        lab[y:y + 4, x:x + 4] = i
    return lab


# ---- training data ---------------------------------------------------------------------------
def test_missing_image_tif(tmp_path):
    (tmp_path / "train" / "s1").mkdir(parents=True)
    with pytest.raises(DataError, match=r"s1/image.tif: file not found"):
        list_train_ids(tmp_path)


def test_unreadable_and_truncated_image(tmp_path):
    folder = write_sample(tmp_path, image=np.random.default_rng(0).integers(0, 255, (64, 64, 4), dtype=np.uint8))
    data = (folder / "image.tif").read_bytes()
    (folder / "image.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"image.tif: unreadable TIFF"):
        check_train_data(tmp_path, ["s1"])
    (folder / "image.tif").write_bytes(b"this is not a tiff at all")
    with pytest.raises(DataError, match=r"image.tif: unreadable TIFF"):
        CellDataset(tmp_path, ["s1"])[0]


def test_class_file_with_another_shape(tmp_path):
    write_sample(tmp_path, classes={2: np.ones((10, 10))})
    with pytest.raises(DataError, match=r"class2.tif: label map has shape \(10, 10\), but image.tif is \(24, 30\)"):
        check_train_data(tmp_path, ["s1"])


@pytest.mark.parametrize("value, problem", [(1.5, "non-integer"), (-3.0, "negative"), (np.nan, "NaN")])
def test_class_file_with_bad_values(tmp_path, value, problem):
    lab = blob()
    lab[0, 0] = value
    write_sample(tmp_path, classes={1: lab})
    with pytest.raises(DataError, match=rf"class1.tif: .*{problem}"):
        check_train_data(tmp_path, ["s1"])


def test_image_without_class_files_is_kept_as_a_negative_example(tmp_path):
    write_sample(tmp_path, "neg")
    write_sample(tmp_path, "pos", classes={2: blob()})
    summary = check_train_data(tmp_path, ["neg", "pos"])
    assert summary == {"images": 2, "instances": [0, 1, 0, 0], "negatives": ["neg"]}
    image, target = CellDataset(tmp_path, ["neg"], train=True)[0]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, *image.shape[1:])


def test_one_pixel_instances_train(tmp_path):
    lab = np.zeros((24, 30))
    lab[3, 4] = 1
    lab[10, 20] = 2
    write_sample(tmp_path, classes={3: lab})
    image, target = CellDataset(tmp_path, ["s1"])[0]
    assert target["boxes"].tolist() == [[4, 3, 5, 4], [20, 10, 21, 11]]
    image, target = CellDataset(tmp_path, ["s1"], sizing=SIZING)[0]  # x4: 96x120
    assert target["boxes"].tolist() == [[16, 12, 20, 16], [80, 40, 84, 44]]
    model = build_model(TINY).train()
    loss = sum(model([image], [target]).values())
    loss.backward()
    assert torch.isfinite(loss)


def test_two_class_files_reusing_an_id(tmp_path):
    write_sample(tmp_path, classes={1: blob(ids=((2, 2, 7),)), 4: blob(ids=((12, 12, 7),))})
    _, target = CellDataset(tmp_path, ["s1"])[0]
    assert target["labels"].tolist() == [1, 4] and target["masks"].sum((1, 2)).tolist() == [16, 16]


@pytest.mark.parametrize("image", [np.full((24, 30), 9, np.uint8), np.full((24, 30, 3), 9, np.uint8),
                                   np.full((24, 30, 4), 9 * 257, np.uint16)], ids=["gray", "rgb", "16bit"])
def test_gray_rgb_and_16_bit_images(tmp_path, image):
    write_sample(tmp_path, image=image, classes={1: blob()})
    img, target = CellDataset(tmp_path, ["s1"])[0]
    assert img.shape == (3, 24, 30) and torch.allclose(img, torch.full_like(img, 9 / 255))


def test_empty_train_folder_and_missing_data_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="is empty; expected one folder per image"):
        list_train_ids(tmp_path)
    with pytest.raises(DataError, match="does not exist; expected .*train/<id>/image.tif"):
        list_train_ids(tmp_path / "missing")
    with pytest.raises(DataError, match="does not exist"):
        train.main(["--data-dir", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run")])


# ---- test data -------------------------------------------------------------------------------
def make_test_dir(root, n=2):
    (root / "test_release").mkdir(parents=True)
    table = []
    for i in range(n):
        tifffile.imwrite(root / "test_release" / f"t{i}.tif", np.zeros((20, 25, 4), np.uint8), compression="lzw")
        table.append({"file_name": f"t{i}.tif", "id": i + 1, "height": 20, "width": 25})
    (root / "test_image_name_to_ids.json").write_text(json.dumps(table))
    return table


@pytest.mark.parametrize("content, message", [(None, "file not found"), ("{not json", "not valid JSON"),
                                              ("[]", "non-empty JSON list"),
                                              ('[{"file_name": "a.tif", "id": 1}]', "must have file_name, id, height"),
                                              ('[{"file_name": "a.tif", "id": "1", "height": 2, "width": 2}]', "integer"),
                                              ('[{"file_name": "a.tif", "id": 1, "height": 2, "width": 2},'
                                               ' {"file_name": "b.tif", "id": 1, "height": 2, "width": 2}]', "appears twice")])
def test_id_table_missing_or_malformed(tmp_path, content, message):
    if content is not None:
        (tmp_path / "test_image_name_to_ids.json").write_text(content)
    with pytest.raises(DataError, match=rf"test_image_name_to_ids.json: .*{message}"):
        read_test_table(tmp_path)


def test_listed_file_missing(tmp_path):
    make_test_dir(tmp_path)
    os.remove(tmp_path / "test_release" / "t1.tif")
    with pytest.raises(DataError, match=r"t1.tif: listed in test_image_name_to_ids.json but not found"):
        TestDataset(tmp_path)


def test_unlisted_file_is_skipped_and_said(tmp_path):
    make_test_dir(tmp_path)
    shutil.copy(tmp_path / "test_release" / "t0.tif", tmp_path / "test_release" / "extra.tif")
    ds = TestDataset(tmp_path)
    assert ds.unlisted == ["extra.tif"] and len(ds) == 2


def test_size_in_table_disagrees_with_image(tmp_path):
    table = make_test_dir(tmp_path)
    table[1]["height"] = 21
    (tmp_path / "test_image_name_to_ids.json").write_text(json.dumps(table))
    with pytest.raises(DataError, match=r"t1.tif: image is 20x25 \(HxW\) but the id table says 21x25"):
        TestDataset(tmp_path)[1]


# ---- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_missing_truncated_or_foreign(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    model = build_model(TINY)
    save_checkpoint({"model": model.state_dict(), "config": TINY}, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is unreadable"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="not written by train.py"):
        load_checkpoint(tmp_path / "raw.pt")


def test_checkpoint_of_another_backbone_or_class_count(tmp_path):
    other = build_model(dict(TINY, BACKBONE="test_efficientnet"))
    model = build_model(TINY)
    with pytest.raises(CheckpointError, match="BACKBONE='test_efficientnet'.*differ in shape or names"):
        load_weights(model, {"model": other.state_dict(), "config": {"BACKBONE": "test_efficientnet"}}, "x.pt")
    state = model.state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(91, 1024)
    with pytest.raises(CheckpointError, match="predicts 90 classes, this model 4"):
        load_weights(model, {"model": state, "config": TINY}, "coco.pt")


# ---- faults ----------------------------------------------------------------------------------
KILL_WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from utils import atomic_write
with atomic_write({path!r}, "wb") as f:
    f.write(b"partial new content")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("name", ["last.pt", "test-results.json"])
def test_killed_while_writing_leaves_the_old_file_whole(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"old complete content")
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert path.read_bytes() == b"old complete content"


def test_disk_full_while_saving(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "config": {}, "epoch": 1, "format": CHECKPOINT_FORMAT}, path)

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last.pt: No space left on device .*unchanged"):
        save_checkpoint({"model": {}, "config": {}, "epoch": 2}, path)
    with pytest.raises(OSError):
        save_json([1, 2, 3], tmp_path / "test-results.json")
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary files left behind


def test_empty_prediction_keeps_the_submission_valid():
    out = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
           "mask_probs": torch.zeros((0, 1, 28, 28))}
    assert predict.image_records(out, 1, 0.5, (20, 25)) == []
    table = [{"file_name": "a.tif", "id": 1, "height": 20, "width": 25}]
    assert infer.check_submission([], table)


def test_non_finite_losses_are_skipped_then_stop(demo_dir):
    class NaNModel(torch.nn.Module):
        def __init__(self, bad_steps):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.bad_steps, self.calls = bad_steps, 0

        def forward(self, images, targets):
            self.calls += 1
            value = torch.tensor(float("nan")) if self.calls in self.bad_steps else torch.tensor(1.0)
            return {"loss_classifier": self.w * value}

    ds = CellDataset(demo_dir, list_train_ids(demo_dir)[:4])
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=lambda b: tuple(zip(*b)))
    cfg = {"WARMUP_ITERS": 0, "SCHEDULE": "plateau", "EPOCHS": 1, "GRAD_CLIP": 0}
    model = NaNModel({2})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats, skipped = engine.train_one_epoch(model, opt, loader, "cpu", {"epoch": 0, "step": 0}, cfg,
                                           weights={"loss_classifier": 1.0})
    assert skipped == {"skipped_steps": 1, "oom_steps": 0} and torch.isfinite(model.w)
    always = NaNModel(set(range(1, 100)))
    monkey = pytest.MonkeyPatch()
    monkey.setattr(engine, "MAX_SKIPPED_STEPS", 3)
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite losses"):
        engine.train_one_epoch(always, torch.optim.SGD(always.parameters(), lr=0.1), loader, "cpu",
                              {"epoch": 0, "step": 0}, cfg, weights={"loss_classifier": 1.0})
    monkey.undo()


# ---- fuzz: random bytes and random arrays never crash deep inside a library --------------------
def test_fuzz_tiff_reader(tmp_path):
    rng = np.random.default_rng(1234)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), compression="lzw")
    good_bytes = good.read_bytes()
    dtypes = [np.uint8, np.int8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_, np.complex64]
    deadline = time.time() + 20
    n = 0
    while time.time() < deadline and n < 300:
        n += 1
        path = tmp_path / f"f{n}.tif"
        kind = n % 3
        if kind == 0:  # random bytes
            path.write_bytes(rng.bytes(int(rng.integers(0, 400))))
        elif kind == 1:  # a real TIFF with random bytes flipped or cut
            data = bytearray(good_bytes)
            for _ in range(int(rng.integers(1, 20))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
            path.write_bytes(bytes(data[: int(rng.integers(8, len(data) + 1))]))
        else:  # random arrays of odd shapes and types
            ndim = int(rng.integers(1, 5))
            shape = tuple(int(s) for s in rng.integers(1, 6, ndim))
            arr = (rng.normal(0, 1e3, shape)).astype(dtypes[n % len(dtypes)])
            try:
                tifffile.imwrite(path, arr)
            except Exception:
                continue
        for read in (lambda p: read_image(p), lambda p: read_label_maps_file(p)):
            try:
                out = read(path)
            except DataError as e:
                assert str(path) in str(e)
            else:
                assert out.dtype in (np.uint8, np.float32)


def read_label_maps_file(path):
    """The label-map reader on one file: copy it in as class1.tif of a folder."""
    folder = path.parent / (path.stem + "_dir")
    folder.mkdir(exist_ok=True)
    shutil.copy(path, folder / "class1.tif")
    try:
        return read_label_maps(folder, (4, 4))
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
