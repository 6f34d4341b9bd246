"""HW3 data: reading the TIFFs, instances from the class label maps, augmentation, the train/val
split, the test-id table, a folder of any images to predict (ImageFolder), and a synthetic dataset in
the same layout for the CPU demo.

Layout (see data/README.md):
    DATA_DIR/train/<id>/image.tif            RGBA uint8 (RGB, gray and 16-bit also accepted)
    DATA_DIR/train/<id>/class{1..4}.tif      float64 label maps: 0 = background, each distinct
                                             positive value = one instance; absent = class absent
    DATA_DIR/test_release/<file_name>.tif
    DATA_DIR/test_image_name_to_ids.json     [{"file_name", "id", "height", "width"}, ...]
"""
import json
import random
import uuid
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.color import hed_from_rgb, rgb_from_hed

from utils import NUM_CLASSES, coco_dict

HED_FROM_RGB, RGB_FROM_HED = hed_from_rgb.astype(np.float32), rgb_from_hed.astype(np.float32)  # skimage's stain matrix
MAX_EXACT_ID = 2**24  # label maps travel as float32 through augmentation: ids up to 2^24 stay exact


class DataError(ValueError):
    """Bad input data. The message names the file and the problem."""


# ----------------------------------------------------------------------------------------------
# reading
def read_tiff(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return tifffile.imread(path)
    except Exception as e:  # tifffile raises many kinds of errors for truncated or corrupt files
        raise DataError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from None


def to_rgb_uint8(arr, path="image", stretch=False):
    """Any 2-D gray, HxWx1/3/4 (or planar 1/3/4xHxW) uint8/uint16/float image -> HxWx3 uint8.

    Alpha is dropped; 16-bit images are scaled by 1/257 (full 16-bit range -> 0..255); float
    images in [0, 1] are scaled by 255, others clipped to 0..255. stretch (ImageFolder): an integer
    image wider than 8 bits is scaled by its own 99.9th percentile instead (-> 255).
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (channels-first) TIFF
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4) or min(arr.shape[:2]) < 1:
        raise DataError(f"{path}: expected a 2-D gray or an RGB(A) image, got an array of shape {arr.shape}")
    if arr.shape[-1] == 2:  # gray + alpha
        arr = arr[..., :1]
    arr = arr[..., :3]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if stretch and np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize > 1:
        # 12-bit data in a 16-bit container is near black at 1/257; Cellpose too normalises each image
        top = max(float(np.percentile(arr, 99.9)), 1.0)
        return (np.clip(arr.astype(np.float32) * (255.0 / top), 0, 255)).round().astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: image has NaN or infinite pixel values")
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return np.clip(arr, 0, 255).round().astype(np.uint8)
    raise DataError(f"{path}: unsupported pixel type {arr.dtype}")


def read_image(path):
    return to_rgb_uint8(read_tiff(path), path)


FOLDER_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")  # what ImageFolder reads


def read_any_image(path):
    """A TIFF, PNG or JPEG (8- or 16-bit) as HxWx3 uint8, an integer image wider than 8 bits stretched
    by its own range (to_rgb_uint8's stretch)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return to_rgb_uint8(read_tiff(path), path, stretch=True)
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{path}: unreadable image (OpenCV could not decode it as {path.suffix.lower()[1:].upper()})")
    if arr.ndim == 3 and arr.shape[-1] >= 3:
        arr = arr[..., [2, 1, 0, *range(3, arr.shape[-1])]]  # OpenCV's BGR(A) -> RGB(A)
    return to_rgb_uint8(arr, path, stretch=True)


def read_label_maps(sample_dir, shape):
    """The class files of one training image as an HxWx4 float32 array (channel k-1 = class k ids)."""
    sample_dir = Path(sample_dir)
    out = np.zeros((shape[0], shape[1], NUM_CLASSES), np.float32)
    for k in range(1, NUM_CLASSES + 1):
        path = sample_dir / f"class{k}.tif"
        if not path.exists():
            continue
        lab = np.asarray(read_tiff(path))
        if lab.ndim == 3 and 1 in (lab.shape[0], lab.shape[-1]):
            lab = lab.squeeze()
        if lab.shape != tuple(shape[:2]):
            raise DataError(f"{path}: label map has shape {lab.shape}, but image.tif is {tuple(shape[:2])}")
        if not np.issubdtype(lab.dtype, np.number) or np.issubdtype(lab.dtype, np.complexfloating):
            raise DataError(f"{path}: label map has non-numeric type {lab.dtype}")
        if np.issubdtype(lab.dtype, np.floating):
            if not np.isfinite(lab).all():
                raise DataError(f"{path}: label map contains NaN or infinite values")
            if (lab != np.round(lab)).any():
                raise DataError(f"{path}: label map contains non-integer values (instance ids must be whole numbers)")
        if lab.min(initial=0) < 0:
            raise DataError(f"{path}: label map contains negative values (instance ids must be >= 0)")
        if lab.max(initial=0) >= MAX_EXACT_ID:
            raise DataError(f"{path}: instance id {lab.max()} is too large (must be < {MAX_EXACT_ID})")
        out[..., k - 1] = lab
    return out


def instances_from_labels(label_maps):
    """HxWx4 label maps -> (masks (N,H,W) uint8, classes (N,) int64 in 1..4, boxes (N,4) float32).

    One instance per distinct positive value per class channel, so two class files may reuse an id.
    Boxes are [x0, y0, x1, y1) with exclusive ends: a 1-pixel instance gets width and height 1.
    """
    h, w = label_maps.shape[:2]
    found = []  # (class, dense id map, id, slices): the masks are allocated once, N x H x W uint8
    for k in range(label_maps.shape[-1]):
        lab = label_maps[..., k]
        ids = np.unique(lab)
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        dense = np.where(lab > 0, np.searchsorted(ids, lab) + 1, 0).astype(np.int32)
        found += [(k + 1, dense, i, sl) for i, sl in enumerate(ndimage.find_objects(dense), start=1) if sl is not None]
    masks = np.zeros((len(found), h, w), np.uint8)
    classes = np.asarray([f[0] for f in found], np.int64)
    boxes = np.zeros((len(found), 4), np.float32)
    for n, (_, dense, i, sl) in enumerate(found):
        masks[n][sl] = dense[sl] == i
        boxes[n] = [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]
    return masks, classes, boxes


# ----------------------------------------------------------------------------------------------
# datasets
def hed_jitter(image, scale, shift):
    """An RGB uint8 image with its stains jittered (Tellez et al. 2018): the optical density split into
    haematoxylin, eosin and DAB by skimage's fixed stain matrix (hed_from_rgb), each stain's concentration
    times scale[k] plus shift[k] (optical-density units), recombined (rgb_from_hed). skimage's
    rgb2hed/hed2rgb clip negative concentrations, which moves pixels by up to 66 grey levels with no
    jitter at all; here nothing is clipped before the end, so scale 1 and shift 0 give the image back."""
    od = -np.log(np.maximum(image[..., :3].astype(np.float32) / 255.0, 1e-6))  # skimage's floor
    stains = od @ HED_FROM_RGB * np.asarray(scale, np.float32) + np.asarray(shift, np.float32)
    rgb = np.exp(-(stains @ RGB_FROM_HED)) * 255.0
    out = image.copy()
    out[..., :3] = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return out


class HEDJitter(A.ImageOnlyTransform):
    """The stain jitter as an albumentations transform: scale in [1 - strength, 1 + strength] and shift in
    [-strength, strength] drawn per stain (hed_jitter). albumentations' HEStain rebuilds every pixel from a
    preset stain matrix not fitted to the image: at neutral settings it already moves the course sample's
    pixels by 9-24 grey levels and turns brown nuclei violet."""

    def __init__(self, strength=0.05, p=1.0):
        super().__init__(p=p)
        self.strength = float(strength)

    def get_params(self):
        s = self.strength
        return {"scale": self.random_generator.uniform(1 - s, 1 + s, 3), "shift": self.random_generator.uniform(-s, s, 3)}

    def apply(self, img, scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0), **params):
        return hed_jitter(img, scale, shift)


def train_augmentation(stain=0.0, strength=0.05, to_gray=0.1):
    """Flips, 90-degree and small free rotations (nearest-neighbour for the label maps), to-gray with
    probability to_gray (TO_GRAY; each transform draws from its own seed, so p=0 changes no other draw); with
    stain > 0 also, with that probability, the HED stain jitter of the given strength (HEDJitter) and a
    brightness/contrast change. Pixel-level only: the label maps are never touched by it."""
    steps = [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Rotate(limit=30, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.3),
        A.ToGray(p=to_gray),
    ]
    if stain > 0:  # absent (not p=0) when off, so the augmentation stream of other runs is unchanged
        steps.insert(4, A.Sequential([HEDJitter(strength, p=1.0),
                                      A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=1.0)],
                                     p=stain))
    return A.Compose(steps)


def seed_augmentation(compose, seed):
    """Seed an albumentations pipeline so that its transforms draw independently. Its own
    set_random_seed hands every transform the same seed, so their first draws (apply or not) agree:
    two p=0.5 flips then fire together or not at all (a 180-degree turn, never a mirror), and half
    the images get no augmentation. Here each transform, nested ones too, gets its own seed, spawned
    from `seed` (numpy's SeedSequence)."""
    compose.set_random_seed(seed)
    children = list(compose.transforms)
    for child, child_seed in zip(children, np.random.SeedSequence(seed).generate_state(len(children))):
        if isinstance(child, A.BaseCompose):
            seed_augmentation(child, int(child_seed))
        else:
            child.set_random_seed(int(child_seed))


def list_train_ids(data_dir):
    """Sorted sample folder names under DATA_DIR/train, with clear errors for a wrong layout."""
    train_dir = Path(data_dir) / "train"
    if not Path(data_dir).is_dir():
        raise DataError(f"data folder {data_dir} does not exist; expected {data_dir}/train/<id>/image.tif "
                        f"(+ class1..4.tif), {data_dir}/test_release/*.tif and "
                        f"{data_dir}/test_image_name_to_ids.json (see data/README.md)")
    if not train_dir.is_dir():
        raise DataError(f"{train_dir} does not exist; expected {train_dir}/<id>/image.tif (+ class1..4.tif)")
    ids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not ids:
        raise DataError(f"{train_dir} is empty; expected one folder per image: {train_dir}/<id>/image.tif")
    missing = [i for i in ids if not (train_dir / i / "image.tif").is_file()]
    if missing:
        raise DataError(f"{train_dir / missing[0] / 'image.tif'}: file not found "
                        f"({len(missing)} sample folder(s) without image.tif)")
    return ids


def check_train_data(data_dir, ids):
    """Read every training image and its class files once, before any training, so a bad file stops
    the run at once with a DataError naming it. Returns {'images', 'instances' per class, 'negatives'}:
    images without any instance are kept as negative examples (the model learns background there)."""
    train_dir = Path(data_dir) / "train"
    instances, negatives = [0] * NUM_CLASSES, []
    for i in ids:
        image = read_image(train_dir / i / "image.tif")
        labels = read_label_maps(train_dir / i, image.shape)
        counts = [int(np.unique(labels[..., k][labels[..., k] > 0]).size) for k in range(NUM_CLASSES)]
        instances = [a + b for a, b in zip(instances, counts)]
        if not any(counts):
            negatives.append(i)
    return {"images": len(ids), "instances": instances, "negatives": negatives}


def split_ids(ids, val_fraction, seed):
    """Seeded train/val split of sample ids: (train_ids, val_ids), each sorted."""
    ids = sorted(ids)
    n_val = int(round(len(ids) * val_fraction)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), max(len(ids) - 1, 0))
    shuffled = ids[:]
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def resize_factor(height, width, min_size, max_size, scale=0.0, cap=True):
    """The one sizing rule of training, validation and inference: model-input pixels per image pixel.

    scale > 0: that fixed factor on every image, so a cell has the same size in pixels whatever the
    image size (2.0 = the top entries' 2x upscaling); scale 0: torchvision's rule, the shorter side
    to min_size unless the longer side would pass max_size. cap: never let the longer side pass
    max_size (training crops and inference tiles keep to that limit instead of shrinking the image)."""
    if scale > 0:
        return min(scale, max_size / max(height, width)) if cap else scale
    return min(min_size / min(height, width), max_size / max(height, width))


def resize_image(image, factor):
    """CxHxW float image resized by factor, bilinear, with torchvision's size arithmetic
    (GeneralizedRCNNTransform: output size floor(side x factor))."""
    if factor == 1.0:
        return image
    return F.interpolate(image[None], scale_factor=factor, mode="bilinear", recompute_scale_factor=True,
                         align_corners=False)[0]


def resize_labels(label_maps, size):
    """HxWx4 label maps -> size, nearest neighbour (torchvision's mask resize), still float32 ids."""
    if tuple(label_maps.shape[:2]) == tuple(size):
        return label_maps
    lab = torch.from_numpy(np.ascontiguousarray(label_maps)).permute(2, 0, 1)[None]
    return F.interpolate(lab, size=tuple(size), mode="nearest")[0].permute(1, 2, 0).numpy()


def random_crop_window(height, width, side):
    """A uniformly placed window of at most side x side pixels (torch's RNG): (y0, y1, x0, x1)."""
    th, tw = min(height, side), min(width, side)
    y0 = int(torch.randint(0, height - th + 1, ()))
    x0 = int(torch.randint(0, width - tw + 1, ()))
    return y0, y0 + th, x0, x0 + tw


class CellDataset(torch.utils.data.Dataset):
    """Training/validation images of DATA_DIR/train. Items: (image float CxHxW in [0,1], target).

    target: boxes (N,4) float32 xyxy, labels (N,) int64 in 1..4, masks (N,H,W) uint8, image_id int
    (the index in `ids`). Images without any class file are kept as negative examples (N = 0).
    Augmentation (train=True) acts on the image and the HxWx4 label maps together; instances are
    taken from the augmented maps, so boxes always fit the masks.

    sizing (min_size, max_size, scale): resize here to the model's input size (resize_factor), so
    the masks exist only at that size, as uint8: the model itself never resizes. The label maps
    (4 float32 channels) are what gets resized, never N masks. Where a fixed scale would make the
    longer side pass max_size, training takes a random crop of max_size / scale image pixels a
    side instead (validation shrinks the image to fit). sizing None: the image's own size
    (validation ground truth and inference, which resize on their own).

    jitter (lo, hi) (SCALE_JITTER, training only): the sizing rule's factor times a random factor in
    [lo, hi]; where that input would pass max_size, a random window that fits is cropped first, as for
    a fixed scale. stain (STAIN_AUG): probability of the stain jitter of train_augmentation, of strength
    stain_strength (STAIN_STRENGTH). to_gray (TO_GRAY): probability of a to-gray image.
    """

    def __init__(self, data_dir, ids, train=False, sizing=None, jitter=(1.0, 1.0), stain=0.0, stain_strength=0.05,
                 to_gray=0.1):
        self.dir = Path(data_dir) / "train"
        self.ids = list(ids)
        self.train = train
        self.augment = train_augmentation(stain, stain_strength, to_gray) if train else None
        self.sizing = sizing
        self.jitter = check_jitter(jitter)

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        sample = self.dir / self.ids[index]
        image = read_image(sample / "image.tif")
        return image, read_label_maps(sample, image.shape)

    def __getitem__(self, index):
        image, labels = self.load(index)
        factor = 1.0
        if self.sizing is not None:
            min_size, max_size, scale = self.sizing
            h, w = image.shape[:2]
            factor = resize_factor(h, w, min_size, max_size, scale, cap=not self.train)
            if self.train:
                if self.jitter != (1.0, 1.0):  # scale jitter: a random factor on top of the sizing rule's
                    factor *= float(torch.empty(()).uniform_(*self.jitter))
                if max(h, w) * factor > max_size * (1 + 1e-6):  # a random window that fits MAX_SIZE at this factor
                    y0, y1, x0, x1 = random_crop_window(h, w, int(max_size / factor))
                    image, labels = image[y0:y1, x0:x1], labels[y0:y1, x0:x1]
                factor = min(factor, max_size / max(image.shape[:2]))
        if self.augment is not None:
            # albumentations keeps its own RNG: seed it from torch's, which train.py seeds (and which
            # DataLoader seeds per worker), so augmentation is reproducible and resumable
            seed_augmentation(self.augment, int(torch.randint(0, 2**31 - 1, ())))
            out = self.augment(image=image, mask=labels)
            image, labels = out["image"], out["mask"]
        image = resize_image(to_tensor(image), factor)
        labels = resize_labels(labels, image.shape[-2:])
        masks, classes, boxes = instances_from_labels(labels)
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(classes),
                  "masks": torch.from_numpy(masks), "image_id": index}
        return image, target


def check_jitter(jitter):
    """SCALE_JITTER [lo, hi] as a (lo, hi) pair of floats with 0 < lo <= hi; [1, 1] is off."""
    try:
        lo, hi = (float(v) for v in jitter)
    except (TypeError, ValueError):
        raise ValueError(f"SCALE_JITTER {jitter!r}: give [lo, hi], e.g. [0.5, 2.0] ([1, 1] = off)") from None
    if not 0 < lo <= hi:
        raise ValueError(f"SCALE_JITTER {jitter!r}: needs 0 < lo <= hi ([1, 1] = off)")
    return lo, hi


def to_tensor(image):
    """HxWx3 uint8 -> 3xHxW float in [0, 1]. The model normalises (once, with the backbone's mean/std)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def read_test_table(data_dir):
    """Validated records of DATA_DIR/test_image_name_to_ids.json."""
    path = Path(data_dir) / "test_image_name_to_ids.json"
    if not path.is_file():
        raise DataError(f"{path}: file not found (the test-id table; expected a JSON list of "
                        '{"file_name", "id", "height", "width"})')
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(table, list) or not table:
        raise DataError(f"{path}: expected a non-empty JSON list of records")
    seen = set()
    for i, rec in enumerate(table):
        if not isinstance(rec, dict) or not {"file_name", "id", "height", "width"} <= set(rec):
            raise DataError(f"{path}: record {i} must have file_name, id, height and width, got {rec!r}")
        if not all(isinstance(rec[k], int) and not isinstance(rec[k], bool) for k in ("id", "height", "width")):
            raise DataError(f"{path}: record {i} must have integer id, height and width, got {rec!r}")
        if rec["id"] in seen:
            raise DataError(f"{path}: image id {rec['id']} appears twice")
        seen.add(rec["id"])
    return table


class TestDataset(torch.utils.data.Dataset):
    """The images listed in the test-id table. Items: (image float CxHxW in [0,1], record)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, data_dir, table=None):
        self.dir = Path(data_dir) / "test_release"
        self.table = read_test_table(data_dir) if table is None else table
        missing = [r["file_name"] for r in self.table if not (self.dir / r["file_name"]).is_file()]
        if missing:
            raise DataError(f"{self.dir / missing[0]}: listed in test_image_name_to_ids.json but not found "
                            f"({len(missing)} listed file(s) missing)")
        listed = {r["file_name"] for r in self.table}
        self.unlisted = sorted(p.name for p in self.dir.glob("*.tif") if p.name not in listed)

    def __len__(self):
        return len(self.table)

    def __getitem__(self, index):
        rec = self.table[index]
        path = self.dir / rec["file_name"]
        image = read_image(path)
        if image.shape[:2] != (rec["height"], rec["width"]):
            raise DataError(f"{path}: image is {image.shape[0]}x{image.shape[1]} (HxW) but the id table "
                            f"says {rec['height']}x{rec['width']}")
        return to_tensor(image), rec


class ImageFolder(torch.utils.data.Dataset):
    """Every TIFF/PNG/JPEG directly in a folder, sorted by name, any size (infer.py --images). Items: (image
    float CxHxW in [0,1], record {"id": index, "file_name": name in the folder}); `table` holds the records."""

    def __init__(self, folder):
        self.dir = Path(folder)
        if not self.dir.is_dir():
            raise DataError(f"{self.dir}: not a folder (--images takes a folder of images)")
        names = sorted(p.name for p in self.dir.iterdir()
                       if p.is_file() and p.suffix.lower() in FOLDER_EXTENSIONS and not p.name.startswith("."))
        if not names:
            raise DataError(f"{self.dir} holds no image to predict (read: {', '.join(FOLDER_EXTENSIONS)})")
        seen = {}
        for name in names:
            other = seen.setdefault(Path(name).stem.casefold(), name)
            if other != name:
                raise DataError(f"{self.dir / other} and {self.dir / name} share a name before the extension (case "
                                "ignored), so their outputs would share one folder: rename one")
        self.table = [{"id": i, "file_name": name} for i, name in enumerate(names)]

    def __len__(self):
        return len(self.table)

    def __getitem__(self, index):
        rec = self.table[index]
        return to_tensor(read_any_image(self.dir / rec["file_name"])), rec


def collate(batch):
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------------------------
# synthetic data in the HW3 layout, for the demo and the tests
# Looks loosely follow the course sample: brown nuclei ~20 px across on a pale violet stroma,
# touching and overlapping, class 2 most frequent, classes 3 and 4 rare, plus faint nuclei
# that carry no label (as in the real annotations).
DEMO_CLASSES = {  # frequency, radius range (px), elongation range, RGB colour
    1: (0.27, (7.0, 10.0), (1.0, 1.3), (75, 40, 30)),    # dark brown, round
    2: (0.60, (5.0, 8.0), (1.4, 2.2), (135, 85, 55)),    # lighter brown, elongated
    3: (0.07, (10.0, 13.0), (1.0, 1.2), (120, 80, 160)),  # large, violet
    4: (0.06, (4.0, 5.5), (1.0, 1.2), (35, 35, 95)),     # small, dark blue
}
BACKGROUND_RGB = (222, 206, 222)
UNLABELLED_RGB = (190, 170, 190)


def _ellipse(shape, cy, cx, ry, rx, angle):
    """Normalised elliptic radius (<1 inside) over an HxW grid, and its bounding slices."""
    r = max(ry, rx) + 1
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, shape[0])
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, shape[1])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return np.sqrt((u / rx) ** 2 + (v / ry) ** 2), (slice(y0, y1), slice(x0, x1))


def synth_image(rng, height, width, density=0.55):
    """One synthetic image: (RGB uint8 HxWx3, instance id map HxW int32, class of each id {id: k})."""
    owner = np.zeros((height, width), np.int32)
    shade = np.ones((height, width), np.float32)
    cls_of, colour_of = {}, {}
    freqs = np.array([DEMO_CLASSES[k][0] for k in (1, 2, 3, 4)])
    n_cells = max(1, int(density * height * width / (np.pi * 8.0**2)))
    unlabelled = []
    for i in range(1, n_cells + 1):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if rng.random() < 0.12:  # a faint nucleus that nobody annotated
            unlabelled.append((cy, cx, rng.uniform(5, 8)))
            continue
        k = int(rng.choice([1, 2, 3, 4], p=freqs / freqs.sum()))
        _, (rmin, rmax), (emin, emax), rgb = DEMO_CLASSES[k]
        r, e = rng.uniform(rmin, rmax), rng.uniform(emin, emax)
        rho, sl = _ellipse(owner.shape, cy, cx, r * np.sqrt(e), r / np.sqrt(e), rng.uniform(0, np.pi))
        inside = rho < 1
        owner[sl][inside] = i  # later cells overlap earlier ones: touching, partly hidden cells
        shade[sl][inside] = 0.75 + 0.35 * rho[inside]  # darker centre
        cls_of[i] = k
        colour_of[i] = np.clip(np.array(rgb) * rng.uniform(0.85, 1.15), 0, 255)
    # drop slivers left by overlaps, renumber 1..N
    ids, counts = np.unique(owner[owner > 0], return_counts=True)
    keep = ids[counts >= 12]
    owner[(owner > 0) & ~np.isin(owner, keep)] = 0
    lut = np.zeros(n_cells + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    new_owner = lut[owner]
    classes = {int(lut[i]): cls_of[int(i)] for i in keep}

    # render: stroma with fibres, unlabelled faint nuclei, then the cells
    img = np.empty((height, width, 3), np.float32)
    img[:] = BACKGROUND_RGB
    img += ndimage.gaussian_filter(rng.normal(0, 25, (height, width)), 6)[..., None] * np.array([0.6, 0.8, 0.5])
    for cy, cx, r in unlabelled:
        rho, sl = _ellipse(owner.shape, cy, cx, r, r * rng.uniform(0.8, 1.2), 0.0)
        img[sl][rho < 1] = UNLABELLED_RGB
    colours = np.zeros((n_cells + 1, 3), np.float32)
    for i, c in colour_of.items():
        colours[i] = c
    cell = owner > 0
    img[cell] = colours[owner[cell]] * shade[cell, None]
    img = ndimage.gaussian_filter(img, sigma=(0.8, 0.8, 0)) + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), new_owner, classes


def make_demo_data(root, n_train=40, n_test=8, size_range=(96, 176), seed=0):
    """Write a synthetic dataset in the exact HW3 layout under `root` (RGBA LZW image.tif, float64
    class files present only where the class occurs, test_release/ and the id table), and the test
    images' ground truth as test_gt_coco.json (what bench/ablate.py scores against)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for n in range(n_train):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        rgb, owner, classes = synth_image(rng, h, w)
        folder = root / "train" / str(uuid.UUID(int=int(rng.integers(0, 2**63)), version=4))
        folder.mkdir(parents=True, exist_ok=True)
        rgba = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
        tifffile.imwrite(folder / "image.tif", rgba, compression="lzw", photometric="rgb", extrasamples=["unassalpha"])
        for k in range(1, NUM_CLASSES + 1):
            ids_k = [i for i, c in classes.items() if c == k]
            if ids_k:
                lab = np.where(np.isin(owner, ids_k), owner, 0).astype(np.float64)
                tifffile.imwrite(folder / f"class{k}.tif", lab)
    (root / "test_release").mkdir(parents=True, exist_ok=True)
    table, truth = [], []
    for n in range(n_test):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        rgb, owner, classes = synth_image(rng, h, w)
        truth.append({"id": n + 1, "height": h, "width": w, "labels": list(classes.values()),
                      "masks": [owner == i for i in classes]})
        name = f"{uuid.UUID(int=int(rng.integers(0, 2**63)), version=4)}.tif"
        rgba = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
        tifffile.imwrite(root / "test_release" / name, rgba, compression="lzw", photometric="rgb",
                         extrasamples=["unassalpha"])
        table.append({"file_name": name, "id": n + 1, "height": h, "width": w})
    (root / "test_image_name_to_ids.json").write_text(json.dumps(table, indent=1))
    (root / "test_gt_coco.json").write_text(json.dumps(coco_dict(truth)))
    return root
