"""A dataset in the exact HW3 layout whose instance geometry is the real ground truth of the 50 HW3
validation images (assets/hw3-real/val_geometry_coco.json.gz: masks, classes, image sizes 93 px to
2162 px, up to 772 cells), painted with a realistic stain.

    python -m bench.realistic_data data/realistic              # all 50 images, seed 0
    python -m bench.realistic_data data/realistic --seed 1 --test-fraction 0.3
    python -m bench.realistic_data /tmp/small --images 8 --max-side 128   # a few crops (tests)

Writes OUT/train/<uuid>/image.tif (RGBA uint8, LZW) + class{k}.tif (float64 instance ids, present only
where class k occurs) for the training part; OUT/test_release/<uuid>.tif, OUT/test_image_name_to_ids.json
and OUT/test_gt_coco.json (COCO ground truth of the test part, image ids from the id table) for the test
part (bench/ablate.py scores it); OUT/README.txt says how it was made.

Painting, per image (all seeded): one of two stains (H&E-like purple on pink, or brown as the course
sample), a background with a low-frequency stain field and fibre
texture, a random stain tint and brightness; every annotated cell a haematoxylin nucleus whose colour
and darkness depend on its class (jittered per cell), with chromatin speckle, a darker rim and a darker
centre; unannotated distractor nuclei (about 30% as many as the annotated cells, fainter and out of
focus, as the course sample's many unannotated nuclei) in free space; then blur and sensor noise.
"""
import argparse
import json
import uuid
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from bench.hw3real import decode, load_geometry
from dataset import instances_from_labels
from evaluate import coco_ground_truth

# two stains, one picked per image: H&E-like (purple nuclei on pink) and brown (haematoxylin/DAB-like,
# as the course sample); nucleus RGB by class
STAINS = [
    (np.array([226.0, 196.0, 218.0]), {1: (80, 45, 115), 2: (120, 75, 150), 3: (150, 95, 70), 4: (70, 75, 95)}),
    (np.array([214.0, 200.0, 205.0]), {1: (70, 35, 25), 2: (115, 65, 45), 3: (150, 110, 140), 4: (60, 55, 60)}),
]
DISTRACTOR_SHARE = 0.3


def paint(rng, height, width, cells):
    """RGB uint8 image of height x width with `cells` = [(bool mask over (slices), slices, class)]."""
    taken = np.zeros((height, width), bool)
    img = np.empty((height, width, 3), np.float32)
    background, nucleus = STAINS[int(rng.integers(len(STAINS)))]
    tint = background + rng.normal(0, 8, 3)
    img[:] = tint * rng.uniform(0.92, 1.04)
    field = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)).astype(np.float32), 25)
    field /= field.std() + 1e-6
    img *= (1 + 0.05 * field)[..., None]
    fibres = ndimage.gaussian_filter(rng.normal(0, 45, (height, width)).astype(np.float32), (1.0, 4.0))
    img += fibres[..., None] * np.array([0.6, 0.8, 0.55], np.float32)
    speckle = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)).astype(np.float32), 1.0) * 25
    for mask, sl, _ in cells:
        taken[sl] |= mask
    # distractors first, in free space: fainter, blurred nuclei nobody annotated
    sizes = [max(int(np.sqrt(m.sum() / np.pi)), 2) for m, _, _ in cells] or [8]
    layer = np.zeros((height, width), np.float32)
    colour = np.zeros((height, width, 3), np.float32)
    for _ in range(int(DISTRACTOR_SHARE * len(cells)) + (1 if rng.random() < 0.5 else 0)):
        r = float(rng.choice(sizes)) * rng.uniform(0.8, 1.2)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        e = rng.uniform(0.7, 1.4)
        y0, y1 = max(int(cy - 2 * r), 0), min(int(cy + 2 * r) + 1, height)
        x0, x1 = max(int(cx - 2 * r), 0), min(int(cx + 2 * r) + 1, width)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = ((yy - cy) / (r * e)) ** 2 + ((xx - cx) / (r / e)) ** 2 < 1
        if taken[y0:y1, x0:x1][inside].any():
            continue
        k = int(rng.choice([1, 2], p=[0.3, 0.7]))
        layer[y0:y1, x0:x1][inside] = rng.uniform(0.35, 0.7)
        colour[y0:y1, x0:x1][inside] = nucleus[k]
    layer = ndimage.gaussian_filter(layer, 1.5)
    colour = ndimage.gaussian_filter(colour, (1.5, 1.5, 0))
    soft = ndimage.gaussian_filter((layer > 0).astype(np.float32), 1.5) + 1e-6
    img = img * (1 - layer[..., None]) + (colour / soft[..., None]) * layer[..., None]
    # annotated cells: class colour, per-cell jitter, speckle, darker centre and rim
    for mask, sl, k in cells:
        base = np.array(nucleus[k], np.float32) * rng.uniform(0.85, 1.15) + rng.normal(0, 6, 3)
        region = img[sl]
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        depth = dist / max(dist.max(), 1.0)
        shade = 1.05 - 0.2 * depth  # darker towards the centre
        rim = (dist > 0) & (dist <= 1.5)
        pix = base[None, :] * shade[mask][:, None] + speckle[sl][mask][:, None]
        pix[rim[mask]] *= 0.8
        region[mask] = pix
    img = ndimage.gaussian_filter(img, (0.7, 0.7, 0)) + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def image_instances(anns, height, width, window=None):
    """Instances of one image as [(bool mask over slices, slices, class)], cropped to window (y0, x0, h, w)."""
    y0, x0, h, w = window or (0, 0, height, width)
    cells = []
    for ann in anns:
        full = decode(ann)[y0:y0 + h, x0:x0 + w]
        sl = ndimage.find_objects(full.astype(np.uint8))
        if not sl or sl[0] is None:
            continue
        cells.append((full[sl[0]], sl[0], int(ann["category_id"])))
    return cells


def label_maps(cells, height, width):
    """HxWx4 float64 instance-id maps (ids unique across classes; a later cell hides an earlier one)."""
    maps = np.zeros((4, height, width), np.float64)
    for i, (mask, sl, k) in enumerate(cells, start=1):
        for other in range(4):
            maps[other][sl][mask] = 0
        maps[k - 1][sl][mask] = i
    return maps


def write_rgba(path, rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    tifffile.imwrite(path, rgba, compression="lzw", photometric="rgb", extrasamples=["unassalpha"])


def make_realistic_data(out, seed=0, test_fraction=0.3, images=0, max_side=0):
    """Write the dataset (see the module docstring). images > 0: only that many of the 50 (the smallest
    first); max_side > 0: a random window of at most max_side px of each image. Returns the test image count."""
    out = Path(out)
    if (out / "train").exists() or (out / "test_release").exists():
        raise SystemExit(f"{out} already holds a dataset (train/ or test_release/); choose another OUT")
    rng = np.random.default_rng(seed)
    coco = load_geometry()
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    metas = sorted(coco["images"], key=lambda im: im["id"])
    if images:
        metas = sorted(metas, key=lambda im: (im["height"] * im["width"], im["id"]))[:images]
    order = rng.permutation(len(metas))
    n_test = max(1, round(test_fraction * len(metas))) if test_fraction > 0 else 0
    test_idx = set(order[:n_test].tolist())
    table, gt_images = [], []
    for i, meta in enumerate(metas):
        h, w = meta["height"], meta["width"]
        window = None
        if max_side and max(h, w) > max_side:
            wh, ww = min(h, max_side), min(w, max_side)
            window = (int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1)), wh, ww)
            h, w = wh, ww
        cells = image_instances(by_image.get(meta["id"], []), meta["height"], meta["width"], window)
        maps = label_maps(cells, h, w)
        rgb = paint(rng, h, w, cells)
        name = str(uuid.UUID(int=int(rng.integers(0, 2**63)), version=4))
        if i in test_idx:
            (out / "test_release").mkdir(parents=True, exist_ok=True)
            write_rgba(out / "test_release" / f"{name}.tif", rgb)
            image_id = len(table) + 1
            table.append({"file_name": f"{name}.tif", "id": image_id, "height": h, "width": w})
            masks, classes, _ = instances_from_labels(np.moveaxis(maps, 0, -1))
            gt_images.append({"id": image_id, "height": h, "width": w, "masks": masks, "labels": classes})
        else:
            folder = out / "train" / name
            folder.mkdir(parents=True, exist_ok=True)
            write_rgba(folder / "image.tif", rgb)
            for k in range(4):
                if maps[k].any():
                    tifffile.imwrite(folder / f"class{k + 1}.tif", maps[k])
    (out / "test_release").mkdir(parents=True, exist_ok=True)
    (out / "test_image_name_to_ids.json").write_text(json.dumps(table, indent=1))
    (out / "test_gt_coco.json").write_text(json.dumps(coco_ground_truth(gt_images).dataset))
    (out / "README.txt").write_text(
        f"made by bench/realistic_data.py (seed {seed}, test fraction {test_fraction}, images {images or 'all'}, "
        f"max side {max_side or 'none'}): real HW3 validation geometry, painted; test_gt_coco.json is the "
        "COCO ground truth of test_release/ (ids from test_image_name_to_ids.json)\n")
    return len(table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--images", type=int, default=0, help="only the N smallest images (0 = all 50)")
    ap.add_argument("--max-side", type=int, default=0, help="crop each image to a random window of this size")
    args = ap.parse_args(argv)
    n_test = make_realistic_data(args.out, args.seed, args.test_fraction, args.images, args.max_side)
    n_train = len(list((Path(args.out) / "train").iterdir()))
    print(f"wrote {args.out}: {n_train} training images, {n_test} test images with COCO ground truth")


if __name__ == "__main__":
    main()
