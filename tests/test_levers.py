"""The levers of the 0.60+ entries: EMA, scale jitter, stain augmentation, and all of them with the
cascade heads through train.py -> resume -> infer.py."""
import csv
import json

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

import infer
import train
from conftest import SAMPLE, TINY, tiny_args, write_sample
from dataset import CellDataset, HEDJitter, collate, hed_jitter, list_train_ids
from model import build_model
from utils import load_checkpoint
import engine
import predict


# ---- EMA ---------------------------------------------------------------------------------------
def test_ema_follows_its_warm_up_rule_step_by_step(demo_dir):
    """After each optimiser step: ema = d * ema + (1 - d) * weights, d = 1 - (1 + step')^(-2/3) capped at
    EMA, step' = the global step - 1 (timm's warm-up): the first step copies the weights."""
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = build_model(TINY).train()
    ema = ModelEmaV3(model, decay=0.5, use_warmup=True)
    data = CellDataset(demo_dir, list_train_ids(demo_dir)[:3], train=True, sizing=(96, 160, 0.0))
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=collate)
    cfg = dict(TINY, WARMUP_ITERS=0, SCHEDULE="plateau", EPOCHS=1, GRAD_CLIP=10.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for g in optimizer.param_groups:
        g["initial_lr"] = 1e-3
    snapshots = []
    update = ema.update

    def record(m, step=None):
        before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        update(m, step=step)
        snapshots.append((step, before, {k: v.clone() for k, v in m.state_dict().items()},
                          {k: v.clone() for k, v in ema.module.state_dict().items()}))
    ema.update = record
    state = {"epoch": 0, "step": 0}
    engine.train_one_epoch(model, optimizer, loader, "cpu", state, cfg, weights={k: 1.0 for k in TINY_TERMS}, ema=ema)
    assert [s[0] for s in snapshots] == [1, 2, 3]  # the global step of each update
    for step, before, weights, after in snapshots:
        d = min(1 - (1 + (step - 1)) ** (-2 / 3), 0.5) if step > 1 else 0.0
        for k, v in after.items():
            if v.is_floating_point():
                assert torch.allclose(v, d * before[k] + (1 - d) * weights[k], atol=1e-6), (step, k)
    assert snapshots[-1][2].keys() == snapshots[-1][3].keys()
    moved = [k for k, v in snapshots[-1][3].items() if v.is_floating_point() and not torch.equal(v, snapshots[-1][2][k])]
    assert moved  # after three steps the average is not the weights


# ---- SCHEDULE cosine --------------------------------------------------------------------------------
def test_cosine_lr_warms_up_then_anneals_to_zero_over_the_budget(monkeypatch):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.param_groups[0]["initial_lr"] = 1.0
    lr = lambda: opt.param_groups[0]["lr"]  # noqa: E731
    engine.set_lr(opt, 0, 4, progress=0.0)
    assert lr() == pytest.approx(0.001 + 0.999 / 4)  # warm-up, times cos(0) = 1
    for progress, factor in ((0.0, 1.0), (0.5, 0.5), (0.75, 0.5 * (1 - 2 ** -0.5)), (1.0, 0.0), (1.3, 0.0)):
        engine.set_lr(opt, 10, 4, progress)
        assert lr() == pytest.approx(factor, abs=1e-12), progress
    opt.param_groups[0]["lr"] = 0.25  # plateau: once warmed up the scheduler's LR stands
    engine.set_lr(opt, 10, 4)
    assert lr() == 0.25
    # progress: the larger share used of EPOCHS x steps per epoch and of MAX_MINUTES (deadline = when it ends)
    cfg = {"EPOCHS": 10, "MAX_MINUTES": 1.0}
    monkeypatch.setattr(engine.time, "time", lambda: 1000.0)
    assert engine.budget_used(cfg, 25, 5, None, "cpu") == pytest.approx(0.5)
    assert engine.budget_used(cfg, 5, 5, 1000.0 + 15, "cpu") == pytest.approx(0.75)  # 45 of 60 s used
    assert engine.budget_used(cfg, 40, 5, 1000.0 + 45, "cpu") == pytest.approx(0.8)  # the steps' share is larger
    assert engine.budget_used(dict(cfg, MAX_MINUTES=0.0), 5, 5, 1000.0 + 15, "cpu") == pytest.approx(0.1)


def test_cosine_run_logs_the_annealed_lr_and_refuses_an_unknown_schedule_or_a_switch(demo_dir, tmp_path):
    run = tmp_path / "cosine"
    train.main(tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(run), EPOCHS=2, LR=1e-3, WARMUP_ITERS=1,
                         SCHEDULE="cosine", LR_PATIENCE=0, VAL_FRACTION=0.34, NUM_WORKERS=0,
                         VAL_DETECTIONS_PER_IMAGE=10, MIN_VAL_IMAGES=1))
    ckpt = load_checkpoint(run / "last.pt")
    n = ckpt["state"]["step"] // 2  # steps an epoch
    logged = [float(r["lr"]) for r in csv.DictReader((run / "metrics.csv").read_text().splitlines())]
    # each epoch's last step set its LR from the steps before it (plateau would have logged 1e-3, then with
    # LR_PATIENCE 0 halved it after an epoch without a better val AP50)
    assert logged == pytest.approx([1e-3 * 0.5 * (1 + np.cos(np.pi * (e * n - 1) / (2 * n))) for e in (1, 2)])
    assert ckpt["config"]["SCHEDULE"] == "cosine"
    with pytest.raises(SystemExit, match="--schedule 'step'"):
        train.resolve_config(tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(tmp_path / "x"), SCHEDULE="step"))
    with pytest.raises(SystemExit, match="this run trained with SCHEDULE cosine"):  # the LR would go on from ~0
        train.resolve_config(["--run-dir", str(run), "--resume", "true", "--epochs", "4", "--schedule", "plateau"])
    cfg, _ = train.resolve_config(["--run-dir", str(run), "--resume", "true", "--epochs", "4"])
    assert cfg["SCHEDULE"] == "cosine"  # kept where not given
    assert cfg["ROI_BATCH_SIZE"] == TINY["ROI_BATCH_SIZE"] == 64  # the run's RoIs, not auto's 128 from scratch


TINY_TERMS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@pytest.fixture(scope="module")
def all_levers(demo_dir, tmp_path_factory):
    """A cascade + EMA + scale jitter + stain run of 2 epochs, and the same stopped at 1 and resumed."""
    root = tmp_path_factory.mktemp("levers")
    levers = dict(HEADS="cascade", EMA=0.9, SCALE_JITTER=[0.5, 2.0], STAIN_AUG=0.5, LOSSES="report")
    common = dict(DATA_DIR=str(demo_dir), BATCH_SIZE=2, LR=1e-3, WARMUP_ITERS=2, VAL_FRACTION=0.34, NUM_WORKERS=0,
                  VAL_DETECTIONS_PER_IMAGE=50, MIN_VAL_IMAGES=1, **levers)
    whole, parts = root / "whole", root / "parts"
    train.main(tiny_args(RUN_DIR=str(whole), EPOCHS=2, **common))
    train.main(tiny_args(RUN_DIR=str(parts), EPOCHS=1, **common))
    train.main(["--run-dir", str(parts), "--resume", "--epochs", "2"])
    return whole, parts


def test_ema_is_what_best_pt_holds_and_infer_uses(all_levers, demo_dir):
    whole, _ = all_levers
    best = load_checkpoint(whole / "best.pt")
    assert best["config"]["EMA"] == 0.9 and "ema" in best
    differs = [k for k, v in best["ema"].items() if v.is_floating_point() and not torch.equal(v, best["model"][k])]
    assert differs  # the average, not the trained weights
    rows = list(csv.DictReader((whole / "metrics.csv").read_text().splitlines()))
    decays = [float(r["ema_decay"]) for r in rows]  # the decay in force: timm's warm-up below EMA
    assert len(decays) == 2 and 0 < decays[0] < decays[1] <= 0.9
    model, _ = predict.load_model(whole / "best.pt", "cpu", infer.prediction_settings(DETECTIONS_PER_IMAGE=50))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in best["ema"].items())
    # validation scored the averaged weights: re-scoring them as validation predicts gives the logged val AP50
    val = CellDataset(demo_dir, best["val_ids"])
    validation = json.loads((whole / "config.json").read_text())["VALIDATION"]
    opts = predict.predict_options(best["config"], validation)
    metrics, _ = engine.evaluate_model(model, val, "cpu", opts)
    assert metrics["ap50"] == pytest.approx(best["state"]["history"][best["epoch"] - 1]["val_ap50"], abs=1e-9)


def test_validation_scores_the_average(demo_dir, tmp_path, monkeypatch):
    """The weights validation predicts with are the average that best.pt holds as 'ema', not the trained ones
    (checked on the weights themselves: after a tiny run both can score AP50 0)."""
    seen = []
    validate = engine.validate

    def spy(model, *args):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return validate(model, *args)

    monkeypatch.setattr(engine, "validate", spy)
    train.main(tiny_args(DATA_DIR=str(demo_dir), RUN_DIR=str(tmp_path / "r"), EPOCHS=1, EMA=0.9, LR=1e-3,
                         WARMUP_ITERS=2, VAL_FRACTION=0.34, NUM_WORKERS=0, VAL_DETECTIONS_PER_IMAGE=10,
                         MIN_VAL_IMAGES=1))
    best = load_checkpoint(tmp_path / "r" / "best.pt")
    assert len(seen) == 1 and all(torch.equal(seen[0][k], v) for k, v in best["ema"].items())
    assert any(v.is_floating_point() and not torch.equal(seen[0][k], v) for k, v in best["model"].items())


def test_all_levers_resume_to_the_uninterrupted_run(all_levers):
    whole, parts = all_levers
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(parts / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and b["config"]["HEADS"] == "cascade"
    for key in ("train_loss", "loss_classifier", "loss_box_ciou", "val_loss", "val_ap50"):
        assert b["state"]["history"][1][key] == pytest.approx(a["state"]["history"][1][key], rel=1e-5, abs=1e-7), key
    for k, v in a["ema"].items():  # the average was restored and went on as in the uninterrupted run
        assert torch.allclose(b["ema"][k].float(), v.float(), rtol=1e-5, atol=1e-6), k


def test_all_levers_infer_a_valid_submission(all_levers, demo_dir, tmp_path):
    whole, _ = all_levers
    out = tmp_path / "test-results.json"
    infer.main(["--checkpoint", str(whole / "best.pt"), "--data-dir", str(demo_dir), "--output-json", str(out),
                "--num-workers", "0", "--detections-per-image", "20", "--score-threshold", "0.0", "--tta", "flips"])
    table = json.loads((demo_dir / "test_image_name_to_ids.json").read_text())
    assert infer.check_submission(json.loads(out.read_text()), table)


@pytest.mark.parametrize("flag,value,message", [
    ("--heads", "fancy", "HEADS 'fancy'"), ("--scale-jitter", "[2, 1]", "lo <= hi"),
    ("--scale-jitter", "[0.5]", "give \\[lo, hi\\]"), ("--stain-aug", "1.5", "a probability"),
    ("--to-gray", "-0.1", "a probability"),
    ("--to-gray", "1.5", "a probability"),
    ("--ema", "1.0", "a decay in"), ("--backbone", "torchvision/maskrcnn_resnet50_fpn_v2", "set FPN_CHANNELS 256")])
def test_bad_lever_values_are_refused(flag, value, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(tiny_args(DATA_DIR=str(tmp_path), RUN_DIR=str(tmp_path / "r")) + [flag, value])


# ---- scale jitter ------------------------------------------------------------------------------
def blob_sample(root, h=90, w=120, n=12, seed=0):
    """A training image with n rectangular cells of class 2."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w))
    for i in range(1, n + 1):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        lab[y:y + rng.integers(3, 9), x:x + rng.integers(3, 9)] = i
    image = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
    write_sample(root, "j", image=image, classes={2: lab})
    return h, w


def test_scale_jitter_factors_stay_in_range_and_masks_fit_boxes(tmp_path):
    h, w = blob_sample(tmp_path)
    base = min(96 / h, 4000 / w)  # the sizing rule's factor; MAX_SIZE far away: nothing is cropped
    data = CellDataset(tmp_path, ["j"], train=True, sizing=(96, 4000, 0.0), jitter=(0.5, 2.0))
    torch.manual_seed(0)
    factors = []
    for _ in range(40):
        image, target = data[0]
        factors.append(min(image.shape[-2:]) / min(h, w))  # RandomRotate90 may swap the sides
        assert image.shape[-2:] == target["masks"].shape[-2:] and target["masks"].dtype == torch.uint8
        keep = target["masks"].flatten(1).any(1).bool()
        assert torch.equal(masks_to_boxes(target["masks"][keep].bool()) + torch.tensor([0, 0, 1, 1]), target["boxes"][keep])
    assert 0.5 * base - 0.02 <= min(factors) < 0.8 * base and 1.6 * base < max(factors) <= 2.0 * base + 0.02
    # MAX_SIZE near: large factors crop a random window, never an input side over MAX_SIZE
    data = CellDataset(tmp_path, ["j"], train=True, sizing=(96, 128, 0.0), jitter=(0.5, 2.0))
    sides = []
    for _ in range(40):
        image, target = data[0]
        sides.append(max(image.shape[-2:]))
        keep = target["masks"].flatten(1).any(1).bool()
        assert torch.equal(masks_to_boxes(target["masks"][keep].bool()) + torch.tensor([0, 0, 1, 1]), target["boxes"][keep])
    assert max(sides) <= 128 and min(sides) < 100


def test_jitter_off_keeps_the_sizing_rule(tmp_path):
    h, w = blob_sample(tmp_path)
    torch.manual_seed(0)
    for _ in range(5):
        image, target = CellDataset(tmp_path, ["j"], train=True, sizing=(96, 160, 0.0))[0]
        assert sorted(image.shape[-2:]) == [96, int(w * 96 / h)]  # RandomRotate90 may swap the sides


# ---- augmentation draws ----------------------------------------------------------------------------
def test_augmentation_transforms_draw_independently():
    """Each transform of the pipeline decides on its own: with p 0.5 / 0.5 / 0.5 / 0.3 / 0.1, about 8% of
    the images go through unchanged (albumentations' own seeding gives all transforms one seed: ~48%),
    and the horizontal and vertical flips occur alone as well as together."""
    import albumentations as A
    from dataset import seed_augmentation, train_augmentation
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
    aug = train_augmentation()
    unchanged = 0
    for seed in range(200):
        seed_augmentation(aug, seed)
        unchanged += np.array_equal(aug(image=image)["image"], image)
    assert unchanged < 40, unchanged
    flips = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    seen = set()
    for seed in range(50):
        seed_augmentation(flips, seed)
        out = flips(image=image)["image"]
        seen.add((np.array_equal(out, image[:, ::-1]), np.array_equal(out, image[::-1]), np.array_equal(out, image[::-1, ::-1])))
    assert {(True, False, False), (False, True, False), (False, False, True)} <= seen  # mirrors, not only 180 degrees


def same_geometry(a_set, b_set, seeds):
    """Yield (a image, b image) of item 0 of two datasets drawn with the same torch seed, asserting that the
    two agree on masks, boxes, labels and image shape (a pixel-only lever moves no geometric draw)."""
    for seed in range(seeds):
        torch.manual_seed(seed)
        a_img, a = a_set[0]
        torch.manual_seed(seed)
        b_img, b = b_set[0]
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["labels"], b["labels"]) and a_img.shape == b_img.shape
        yield a_img, b_img


def test_to_gray_greys_with_its_probability_and_moves_no_other_draw(sample_dir):
    """Same seed, TO_GRAY 0 and 1: the same geometry (masks, boxes, labels), and the TO_GRAY 1 image is the
    TO_GRAY 0 image in grey (R = G = B) every time; TO_GRAY 0 never greys the (coloured) course sample."""
    sizing = (256, 320, 0.0)
    colour = CellDataset(sample_dir, ["course-sample"], train=True, sizing=sizing, to_gray=0.0)
    grey = CellDataset(sample_dir, ["course-sample"], train=True, sizing=sizing, to_gray=1.0)
    for a_img, b_img in same_geometry(colour, grey, seeds=6):
        assert (a_img[0] - a_img[1]).abs().max() > 0.05  # colour kept
        assert torch.equal(b_img[0], b_img[1]) and torch.equal(b_img[1], b_img[2])
        luma = 0.299 * a_img[0] + 0.587 * a_img[1] + 0.114 * a_img[2]  # what ToGray's weighted average gives
        assert (luma - b_img[0]).abs().max() < 2 / 255


def test_to_gray_at_a_drawing_probability_greys_that_share_and_leaves_the_rest_alone():
    """TO_GRAY 0.5 (a probability that draws, unlike 0 and 1): about half the images grey, and every image
    has the geometry of the same seed at TO_GRAY 0 (the to-gray draw moves no other transform's)."""
    from dataset import seed_augmentation, train_augmentation
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (12, 16), dtype=np.uint8)
    never, half = train_augmentation(to_gray=0.0), train_augmentation(to_gray=0.5)
    grey = 0
    for seed in range(200):
        seed_augmentation(never, seed)
        seed_augmentation(half, seed)
        a, b = never(image=image, mask=mask), half(image=image, mask=mask)
        assert np.array_equal(a["mask"], b["mask"])
        is_grey = bool((b["image"] == b["image"][..., :1]).all())  # R = G = B
        assert is_grey or np.array_equal(a["image"], b["image"])
        grey += is_grey
    assert 70 <= grey <= 130, grey


# ---- stain augmentation --------------------------------------------------------------------------
def test_stain_augmentation_changes_pixels_not_masks(sample_dir):
    """Same seed with and without STAIN_AUG: the same geometry (masks, boxes, labels), other pixels."""
    sizing = (256, 320, 0.0)
    plain = CellDataset(sample_dir, ["course-sample"], train=True, sizing=sizing)
    stained = CellDataset(sample_dir, ["course-sample"], train=True, sizing=sizing, stain=1.0)
    changed = 0
    for a_img, b_img in same_geometry(plain, stained, seeds=4):
        changed += (a_img - b_img).abs().mean().item() > 0.01
    assert changed >= 3  # ToGray (p 0.1) may grey both alike


def course_pixels():
    import tifffile
    return tifffile.imread(SAMPLE / "image.tif")[..., :3]


def test_stain_jitter_at_zero_strength_gives_the_image_back():
    """scale 1 and shift 0 (strength 0): every pixel within one grey level (skimage's rgb2hed/hed2rgb round
    trip, which clips negative stains, moves the course sample's pixels by up to 66)."""
    image = course_pixels()
    assert np.abs(hed_jitter(image, [1, 1, 1], [0, 0, 0]).astype(int) - image).max() <= 1
    still = HEDJitter(0.0)
    still.set_random_seed(0)
    assert np.abs(still.apply(image, **still.get_params()).astype(int) - image).max() <= 1


def test_default_stain_jitter_keeps_the_mean_colour_close():
    """At STAIN_STRENGTH's default the course sample's mean colour moves by at most 24 grey levels per
    channel at every corner of the jitter's range (scale 1 +- s, shift +- s for all three stains; 20 at
    worst, measured), and a random draw does move it."""
    image = course_pixels().astype(np.float64)
    s = train.STAIN_STRENGTH
    for scale in (1 - s, 1 + s):
        for shift in (-s, s):
            moved = hed_jitter(image.astype(np.uint8), [scale] * 3, [shift] * 3).reshape(-1, 3).mean(0)
            assert np.abs(moved - image.reshape(-1, 3).mean(0)).max() <= 24, (scale, shift)
    jitter = HEDJitter(s)
    jitter.set_random_seed(1)
    drawn = jitter.get_params()
    assert np.all(np.abs(drawn["scale"] - 1) <= s) and np.all(np.abs(drawn["shift"]) <= s)
    assert np.abs(jitter.apply(image.astype(np.uint8), **drawn).astype(int) - image).mean() > 0.5


def test_stain_strength_reaches_the_jitter(sample_dir):
    data = CellDataset(sample_dir, ["course-sample"], train=True, sizing=(256, 320, 0.0), stain=1.0, stain_strength=0.2)
    found = [t for t in data.augment.transforms[4].transforms if isinstance(t, HEDJitter)]
    assert len(found) == 1 and found[0].strength == 0.2
