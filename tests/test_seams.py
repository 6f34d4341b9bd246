"""Tile seams (predict.predict_tiled): a cell on a cut is kept exactly once whatever each tile estimates of it."""
import torch

import predict

WIDTH, TILE, OVERLAP = 1000, 600, 128  # two tiles, at 0 and 400: the cut at 500, the margin 16 px


class Leaning(torch.nn.Module):
    """Finds each cell painted into channel 0 (its id) and reports its box 1 px off, away from its tile's centre:
    two tiles estimate a cell on the cut in opposite directions."""

    def detect(self, images):  # model.CellMaskRCNN's two steps, which tiled prediction calls
        ids = images[0][0].round().long()
        boxes = []
        for i in ids.unique()[1:].tolist():
            ys, xs = torch.where(ids == i)
            box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            box[[0, 2]] += torch.sign((box[0] + box[2]) / 2 - ids.shape[1] / 2)
            boxes.append(box)
        n = len(boxes)
        boxes = torch.stack(boxes) if n else torch.zeros(0, 4)
        return [{"boxes": boxes, "scores": torch.full((n,), 0.9), "labels": torch.ones(n, dtype=torch.int64)}], None

    def segment(self, features, dets):
        return [dict(d, mask_probs=torch.ones(len(d["boxes"]), 1, 28, 28)) for d in dets]


def tiled(*cells):
    """predict_tiled over a 100 x WIDTH image holding the cells (x0, x1), each 20 px tall."""
    image = torch.zeros(3, 100, WIDTH)
    for i, (x0, x1) in enumerate(cells, 1):
        image[0, 40:60, x0:x1] = i
    assert predict.tile_grid(image.shape[-2:], TILE, OVERLAP)[1] == [0, 400]
    return predict.predict_tiled(Leaning(), image, 1.0, TILE, OVERLAP, 0.5, detections_per_image=100, class_reserve=100)


def test_a_cell_on_the_cut_is_kept_once_when_the_tiles_disagree_about_its_centre(monkeypatch):
    out = tiled((480, 520))  # the left tile says centre 501, the right 499
    assert len(out["boxes"]) == 1
    monkeypatch.setattr(predict, "CORE_MARGIN", 0)  # cores split at the cut alone: neither tile keeps it
    assert len(tiled((480, 520))["boxes"]) == 0


def test_a_cell_inside_one_core_is_kept_once_from_that_tile():
    out = tiled((420, 460))  # in both tiles, centre 440: the left tile's core
    assert out["boxes"].tolist() == [[421.0, 40.0, 461.0, 60.0]]  # the left tile's estimate


def test_touching_cells_either_side_of_the_cut_are_both_kept():
    out = tiled((470, 500), (500, 530))  # each seen by both tiles, their boxes' IoU about 0
    centres = ((out["boxes"][:, 0] + out["boxes"][:, 2]) / 2).sort().values
    assert len(centres) == 2 and (centres - torch.tensor([485.0, 515.0])).abs().max() <= 1
