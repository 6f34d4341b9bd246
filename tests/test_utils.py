import subprocess
import sys

import numpy as np
import pytest

import infer
import train
from evaluate import coco_evaluate, coco_ground_truth
from conftest import ROOT
from utils import apply_overrides, config_block, decode_mask, encode_mask


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 33)])
def test_rle_round_trip(shape):
    rng = np.random.default_rng(0)
    for mask in (rng.random(shape) > 0.5, np.zeros(shape, bool), np.ones(shape, bool)):
        rle = encode_mask(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(shape)
        assert (decode_mask(rle) == mask).all()


def test_cli_overrides_change_constants_with_their_types():
    ns = {"EPOCHS": 50, "LR": 5e-5, "PRETRAINED": True, "BACKBONE": "x", "LOSS_WEIGHTS": {}, "RESUME": False}
    block = [(name, "section", f"what {name} means") for name in ns]
    cfg, given = apply_overrides(ns, block, ["--epochs", "3", "--lr", "1e-3", "--pretrained", "false",
                                             "--backbone", "resnet18", "--loss-weights", '{"loss_mask": 2}', "--resume"])
    assert cfg == {"EPOCHS": 3, "LR": 1e-3, "PRETRAINED": False, "BACKBONE": "resnet18",
                   "LOSS_WEIGHTS": {"loss_mask": 2}, "RESUME": True}
    assert given == set(cfg)
    with pytest.raises(SystemExit):
        apply_overrides(dict(ns), block, ["--epochs", "three"])
    with pytest.raises(SystemExit):
        apply_overrides(dict(ns), block, ["--no-such-constant", "1"])


CONFIG_SCRIPT = '''"""A script."""
LIMIT = 3  # not configuration: before the block

# ---- config: first part
ALPHA = 1.5                   # the first constant,
                              # and its comment goes on here
BETA = [1, 2]  # a list
# a section note that belongs to no constant
GAMMA = "x"  # a string
# ---- config: second part
DELTA = {"a": 1}              # a dict, with 50% of a percent sign
# ---- end of config
AFTER = 2  # not configuration: after the block
'''


def test_config_block_reads_the_constants_their_sections_and_comments(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(CONFIG_SCRIPT)
    assert config_block(path) == [("ALPHA", "first part", "the first constant, and its comment goes on here"),
                                  ("BETA", "first part", "a list"), ("GAMMA", "first part", "a string"),
                                  ("DELTA", "second part", "a dict, with 50% of a percent sign")]


@pytest.mark.parametrize("line", ["EPSILON = 1", "EPSILON: int = 1  # annotated", "lower = 1  # not a constant"])
def test_config_block_refuses_a_constant_it_could_not_explain(tmp_path, line):
    path = tmp_path / "script.py"
    path.write_text(CONFIG_SCRIPT.replace("# ---- end of config", line + "\n# ---- end of config"))
    with pytest.raises(ValueError, match="script.py:1[0-9]"):
        config_block(path)


def test_a_flag_that_is_no_constant_stops():
    with pytest.raises(SystemExit):  # train.py's SCALE is no infer.py constant (that is --input-scale)
        infer.main(["--scale", "2"])
    with pytest.raises(SystemExit):  # not a train.py constant: argparse's refusal
        train.resolve_config(["--mask-threshold=0.4"])


@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_config_comments_are_short(script):
    """Each constant's comment is one line of under 100 characters, two at most (the code's 120 a line)."""
    lines = (ROOT / script).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---- config"))
    end = lines.index("# ---- end of config")
    comments = [line.split("# ", 1)[1] for line in lines[start:end] if not line.startswith("# ----")]
    assert all(len(c) < 100 for c in comments), [c for c in comments if len(c) >= 100]
    assert all(len(line) <= 120 for line in lines[start:end])
    continued = [i for i in range(start, end) if lines[i].startswith(" ") and lines[i].strip().startswith("#")]
    assert not [i for i in continued if i - 1 in continued], "a comment of three lines or more"


@pytest.mark.parametrize("script", ["train.py", "infer.py"])
def test_help_explains_every_constant(script):
    """`python train.py --help` lists every constant of the config block with its comment and default."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    flat = "".join(out.split())  # argparse wraps lines (at spaces and hyphens)
    for name, section, text in config_block(ROOT / script):
        assert text, f"{script}: {name} has no comment to explain it"
        assert "--" + name.lower().replace("_", "-") in out and section in out
        assert "".join(text.split()) in flat, (name, text)


def test_train_constants_overridable_and_demo_preset_yields_to_the_command_line():
    cfg, _ = train.resolve_config(["--epochs", "3", "--backbone", "resnet18", "--pretrained", "false"])
    assert (cfg["EPOCHS"], cfg["BACKBONE"], cfg["PRETRAINED"]) == (3, "resnet18", False)
    assert train.EPOCHS == 50  # the module's defaults are untouched
    cfg, _ = train.resolve_config(["--demo", "true", "--epochs", "1"])
    assert cfg["EPOCHS"] == 1 and cfg["BACKBONE"] == train.DEMO_SETTINGS["BACKBONE"]


def test_coco_evaluate_perfect_and_empty():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:8, 3:9] = 1
    gt = coco_ground_truth([{"id": 0, "height": 20, "width": 20, "masks": [mask], "labels": [2]}])
    perfect = [{"image_id": 0, "category_id": 2, "score": 0.9, "bbox": [3, 2, 6, 6], "segmentation": encode_mask(mask)}]
    assert coco_evaluate(gt, perfect)["ap50"] == pytest.approx(1.0)
    wrong_class = [dict(perfect[0], category_id=1)]
    assert coco_evaluate(gt, wrong_class)["ap50"] == pytest.approx(0.0)
    assert coco_evaluate(gt, [])["ap50"] == 0.0


def test_matching_accuracy_counts_tp_fp_fn():
    from evaluate import matching_accuracy
    a = np.zeros((20, 20), np.uint8)
    a[2:8, 2:8] = 1
    b = np.zeros((20, 20), np.uint8)
    b[10:18, 10:18] = 1
    gt = coco_ground_truth([{"id": 0, "height": 20, "width": 20, "masks": [a, b], "labels": [1, 2]}])
    shifted = np.roll(a, 1, axis=1)  # IoU 30/42 > 0.5, other class: matching is class-agnostic
    far = np.zeros((20, 20), np.uint8)
    far[0:2, 15:20] = 1
    preds = [{"image_id": 0, "category_id": 3, "score": 0.9, "bbox": [0, 0, 1, 1], "segmentation": encode_mask(shifted)},
             {"image_id": 0, "category_id": 1, "score": 0.8, "bbox": [0, 0, 1, 1], "segmentation": encode_mask(a)},
             {"image_id": 0, "category_id": 1, "score": 0.7, "bbox": [0, 0, 1, 1], "segmentation": encode_mask(far)},
             {"image_id": 0, "category_id": 1, "score": 0.1, "bbox": [0, 0, 1, 1], "segmentation": encode_mask(b)}]
    m = matching_accuracy(gt, preds)
    # shifted matches a; the exact copy of a is a duplicate (FP); far is FP; b's only match scores < 0.5 (FN)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1) and m["accuracy"] == pytest.approx(1 / 4)
