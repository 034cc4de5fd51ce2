"""Tests of the multi-MNIST canvases (pyrovae.multi_mnist) and their loader, on the shared
binarized-MNIST copies (never the internet)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import DEAD_URL, shared

from pyrovae.data import Dataset, load_dataset
from pyrovae.errors import PyrovaeError
from pyrovae.multi_mnist import compose


def tight(digit: np.ndarray) -> tuple[int, int, int, int]:
    """The ink box (x0, y0, width, height) of one 28x28 image, by a plain loop."""
    ys, xs = np.nonzero(digit.reshape(28, 28))
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def boxed(digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inked digits and their ink boxes, from the first and last inked row and column."""
    grid = digits.reshape(-1, 28, 28).astype(bool)
    digits, grid = digits[grid.any(axis=(1, 2))], grid[grid.any(axis=(1, 2))]
    rows, cols = grid.any(axis=2), grid.any(axis=1)
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    y1, x1 = 27 - rows[:, ::-1].argmax(axis=1), 27 - cols[:, ::-1].argmax(axis=1)
    return digits, np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1)


def crop(image: np.ndarray, box: np.ndarray, side: int) -> bytes:
    x0, y0, w, h = (int(v) for v in box)
    return image.reshape(side, side)[y0 : y0 + h, x0 : x0 + w].tobytes() + bytes([w, h])


def patterns() -> np.ndarray:
    """Six 28x28 digits whose ink boxes all differ in size (each box's edges inked), so a box
    names the digit it came from."""
    rng = np.random.default_rng(123)
    out = np.zeros((6, 28, 28), np.uint8)
    for i, (x0, y0, w, h) in enumerate([(0, 0, 28, 28), (3, 5, 1, 1), (10, 2, 7, 20), (0, 20, 28, 8), (20, 0, 8, 9), (4, 4, 15, 15)]):
        block = (rng.random((h, w)) < 0.5).astype(np.uint8)
        block[[0, -1], :] = block[:, [0, -1]] = 1
        out[i, y0 : y0 + h, x0 : x0 + w] = block
    return out.reshape(6, 784)


def rebuild(digits: np.ndarray, boxes: np.ndarray, count: int, side: int) -> np.ndarray:
    """The canvas that ``boxes`` describe: each box's digit (known by its size) OR-ed in place."""
    by_size = {tight(d)[2:]: (d.reshape(28, 28), tight(d)[:2]) for d in digits}
    canvas = np.zeros((side, side), np.uint8)
    for x0, y0, w, h in boxes[:count].astype(int):
        digit, (dx, dy) = by_size[(w, h)]
        ox, oy = x0 - dx, y0 - dy
        assert 0 <= ox <= side - 28 and 0 <= oy <= side - 28, "a digit's window leaves the canvas"
        canvas[oy : oy + 28, ox : ox + 28] |= digit
    return canvas.reshape(-1)


@pytest.fixture(scope="module")
def bmnist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Dataset]]:
    """The shared data folder (read only) and binarized MNIST loaded from it, cached apart."""
    root = shared("binarized_mnist", "binarized_mnist_train.amat.gz").parents[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYROVAE_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("PYROVAE_BINARIZED_MNIST_URL", DEAD_URL)
        yield root, load_dataset("binarized-mnist", root, base_url=DEAD_URL)


@pytest.fixture(scope="module")
def multi(bmnist: tuple[Path, Dataset]) -> Dataset:
    return load_dataset("multi-mnist", bmnist[0], base_url=DEAD_URL, canvases=300)


def test_compose_is_seeded_and_deterministic() -> None:
    digits = patterns()
    a, b, c = compose(digits, 500, 7), compose(digits, 500, 7), compose(digits, 500, 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_compose_shapes_dtypes_and_uniform_counts() -> None:
    images, counts, boxes = compose(patterns(), 3000, 0)
    assert images.shape == (3000, 2500) and images.dtype == np.uint8
    assert counts.shape == (3000,) and counts.dtype == np.int64
    assert boxes.shape == (3000, 2, 4) and boxes.dtype == np.float32
    assert set(np.unique(images).tolist()) == {0, 1}
    assert set(np.unique(counts).tolist()) == {0, 1, 2}
    assert (np.abs(np.bincount(counts) / 3000 - 1 / 3) < 0.04).all()
    placed = np.arange(2)[None, :] < counts[:, None]
    assert np.isnan(boxes[~placed]).all() and np.isfinite(boxes[placed]).all()
    assert (images[counts == 0] == 0).all() and (images[counts > 0].sum(axis=1) > 0).all()
    wide = compose(patterns(), 2000, 0, canvas=60, max_objects=3)
    assert wide[0].shape == (2000, 3600) and wide[2].shape == (2000, 3, 4) and set(np.unique(wide[1]).tolist()) == {0, 1, 2, 3}


def test_every_canvas_is_the_or_of_its_boxed_digits() -> None:
    """Each box names its digit (sizes differ): OR-ing the digits back at the boxes rebuilds
    every canvas exactly, overlaps included, and every window lies in the canvas."""
    digits = patterns()
    for side in (50, 28, 33):
        images, counts, boxes = compose(digits, 800, 3, canvas=side)
        for n in range(len(images)):
            np.testing.assert_array_equal(images[n], rebuild(digits, boxes[n], int(counts[n]), side), err_msg=f"canvas {n}")
    overlapping = compose(digits[:1], 400, 0)  # full 28x28 boxes: two on a canvas always overlap
    assert overlapping[0][overlapping[1] == 2].sum(axis=1).max() < 2 * digits[0].sum()


def test_digits_and_offsets_are_drawn_uniformly() -> None:
    digits = patterns()
    _, counts, boxes = compose(digits, 6000, 1)
    placed = boxes[np.arange(2)[None, :] < counts[:, None]]
    sizes = {tight(d)[2:]: i for i, d in enumerate(digits)}
    drawn = np.bincount([sizes[(int(w), int(h))] for w, h in placed[:, 2:]], minlength=6)
    assert (np.abs(drawn / len(placed) - 1 / 6) < 0.03).all()
    full = placed[(placed[:, 2] == 28) & (placed[:, 3] == 28)]  # its box is its window
    for axis in (0, 1):
        offsets = np.bincount(full[:, axis].astype(int), minlength=23)
        assert len(offsets) == 23 and (offsets > 0).all() and abs(full[:, axis].mean() - 11) < 1


def test_a_digit_without_ink_gets_an_empty_box() -> None:
    images, counts, boxes = compose(np.zeros((1, 784), np.uint8), 50, 0)
    placed = boxes[np.arange(2)[None, :] < counts[:, None]]
    assert (images == 0).all() and (placed[:, 2:] == 0).all() and (placed[:, :2] >= 0).all() and (placed[:, :2] <= 22).all()


@pytest.mark.parametrize("bad", [dict(digits=np.full((3, 784), 2, np.uint8)), dict(digits=np.zeros((3, 100), np.uint8)),
                                 dict(digits=np.zeros((0, 784), np.uint8)), dict(count=-1), dict(canvas=27), dict(max_objects=-1)])
def test_compose_refuses_bad_arguments(bad: dict) -> None:
    arguments = dict(digits=patterns(), count=10, seed=0) | bad
    with pytest.raises(PyrovaeError):
        compose(**arguments)


def test_fifty_thousand_canvases_are_fast(bmnist: tuple[Path, Dataset]) -> None:
    digits = bmnist[1].split("train").x.numpy()
    start = time.perf_counter()
    images, counts, boxes = compose(digits, 50000, 0)
    seconds = time.perf_counter() - start
    print(f"composed 50,000 canvases in {seconds:.2f} s")
    assert seconds < 10 and images.shape == (50000, 2500)
    some, span = slice(0, 3000), np.arange(50)
    grid, placed = images[some].reshape(-1, 1, 50, 50).astype(bool), np.isfinite(boxes[some, :, 0])
    x0, y0, w, h = (boxes[some, :, i, None] for i in range(4))  # a NaN row covers nothing
    cols, rows = (span >= x0) & (span < x0 + w), (span >= y0) & (span < y0 + h)
    inside = rows[..., :, None] & cols[..., None, :]
    assert not (grid & ~inside.any(axis=1, keepdims=True)).any(), "ink outside every box"
    ink = grid & inside
    for lines, start, size in ((ink.any(axis=3), y0, h), (ink.any(axis=2), x0, w)):  # a tight box has ink on its edges
        edges = np.nan_to_num(np.concatenate([start, start + size - 1], axis=-1)).astype(int)
        assert np.take_along_axis(lines, edges, axis=2)[placed].all()
    assert (boxes[counts > 0, 0, 2:] <= 28).all() and (boxes[counts > 0, 0, 2:] >= 1).all()


def test_loader_gives_counts_and_boxes(multi: Dataset) -> None:
    assert multi.name == "multi-mnist" and multi.kind == "binary" and multi.event_shape == (2500,) and multi.image_shape == (50, 50)
    assert set(multi.splits) == {"train", "valid"}  # the shared copy withholds the test split
    for part in multi.splits.values():
        assert part.x.shape == (300, 2500) and part.x.dtype == torch.uint8 and set(part.x.unique().tolist()) <= {0, 1}
        assert part.y is not None and part.y.dtype == torch.int64 and set(part.y.unique().tolist()) == {0, 1, 2}
        assert part.boxes is not None and part.boxes.shape == (300, 2, 4) and part.boxes.dtype == torch.float32
        placed = torch.arange(2)[None, :] < part.y[:, None]
        assert torch.isnan(part.boxes[~placed]).all() and torch.isfinite(part.boxes[placed]).all()
        assert (part.boxes[placed][:, :2] >= 0).all() and (part.boxes[placed][:, :2] + part.boxes[placed][:, 2:] <= 50).all()
    batch = multi.with_fields("x,y").batch("valid", torch.arange(5))
    assert torch.equal(batch.args[1], multi.split("valid").y[:5])
    moved = multi.to("meta")
    assert moved.split("train").x.device.type == "meta" and moved.split("train").boxes is multi.split("train").boxes


def test_loader_composes_each_split_from_its_own_digits(bmnist: tuple[Path, Dataset], multi: Dataset) -> None:
    """A canvas with one digit shows that digit's ink inside its box: it is a digit of the same
    split; and each split is the documented seeded composition of that split's digits."""
    for index, name in enumerate(("train", "valid")):
        digits = bmnist[1].split(name).x.numpy()
        part = multi.split(name)
        images, counts, boxes = compose(digits, 300, index)
        assert np.array_equal(part.x.numpy(), images) and np.array_equal(part.y.numpy(), counts)
        np.testing.assert_array_equal(part.boxes.numpy(), boxes)
    own = {name: {crop(d, b, 28) for d, b in zip(*boxed(bmnist[1].split(name).x.numpy()))} for name in ("train", "valid")}
    for name, other in (("valid", "train"), ("train", "valid")):
        part = multi.split(name)
        single = np.flatnonzero(part.y.numpy() == 1)
        crops = [crop(part.x[n].numpy(), part.boxes[n, 0].numpy(), 50) for n in single]
        assert len(crops) > 50 and all(c in own[name] for c in crops)
        assert sum(c in own[other] for c in crops) < len(crops) / 2
    assert not torch.equal(multi.split("train").x, multi.split("valid").x)


def test_loader_seed_changes_every_split(bmnist: tuple[Path, Dataset], multi: Dataset) -> None:
    again = load_dataset("multi-mnist", bmnist[0], base_url=DEAD_URL, canvases=300)
    other = load_dataset("multi-mnist", bmnist[0], base_url=DEAD_URL, canvases=300, seed=1)
    for name in ("train", "valid"):
        assert torch.equal(again.split(name).x, multi.split(name).x)
        assert not torch.equal(other.split(name).x, multi.split(name).x)


def test_loader_defaults_to_one_canvas_per_digit(bmnist: tuple[Path, Dataset]) -> None:
    data = load_dataset("multi-mnist", bmnist[0], base_url=DEAD_URL)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 50000, "valid": 10000}


@pytest.mark.parametrize("canvases", [0, -1, "x", 2.5, True])
def test_loader_refuses_bad_canvases(bmnist: tuple[Path, Dataset], canvases: object) -> None:
    with pytest.raises(PyrovaeError, match="canvases must be a positive integer") as err:
        load_dataset("multi-mnist", bmnist[0], base_url=DEAD_URL, canvases=canvases)
    assert "\n" not in str(err.value)
