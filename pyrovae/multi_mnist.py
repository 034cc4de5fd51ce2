"""Multi-MNIST canvases: binary digits scattered on a blank canvas, with their counts and boxes.

Each canvas holds a number of digits drawn uniformly from ``0..max_objects``; each digit is drawn
uniformly (with replacement) from the given ones and its 28x28 window placed at a uniform integer
offset; overlapping digits combine by pixelwise OR.

References:
    Eslami, Heess, Weber, Tassa, Szepesvari, Kavukcuoglu & Hinton, *Attend, Infer, Repeat: Fast
    Scene Understanding with Generative Models*, NeurIPS 2016, Section 3.1 (multi-MNIST: 50x50
    canvases of 0-2 digits).
"""

from __future__ import annotations

import numpy as np

from pyrovae.errors import PyrovaeError

__all__ = ["compose"]

DIGIT = 28


def _ink_boxes(digits: np.ndarray) -> np.ndarray:
    """The tight ink bounding box ``(x0, y0, width, height)`` of each flat 28x28 digit, ``int64``
    ``(M, 4)``; a digit without ink gets ``(0, 0, 0, 0)``."""
    grid = np.asarray(digits).reshape(-1, DIGIT, DIGIT) != 0
    rows, cols = grid.any(axis=2), grid.any(axis=1)
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    height, width = DIGIT - rows[:, ::-1].argmax(axis=1) - y0, DIGIT - cols[:, ::-1].argmax(axis=1) - x0
    inked = rows.any(axis=1)
    return np.stack([x0, y0, width, height], axis=1) * inked[:, None]


def compose(digits: np.ndarray, count: int, seed: int, canvas: int = 50, max_objects: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Composes ``count`` canvases from binary ``digits`` ``(M, 784)``, drawn with
    ``np.random.default_rng(seed)``.

    Returns:
        images: ``uint8`` ``(count, canvas * canvas)`` of 0/1, row-major;
        counts: ``int64`` ``(count,)``, the digits on each canvas, uniform on ``0..max_objects``;
        boxes: ``float32`` ``(count, max_objects, 4)``, each placed digit's tight ink box
        ``(x0, y0, width, height)`` in pixels (its ink fills columns ``x0 .. x0 + width - 1``),
        rows beyond the count NaN; a digit without ink has width and height 0 at its window's corner.
    """
    digits = np.asarray(digits)
    _check(isinstance(count, int) and not isinstance(count, bool) and count >= 0, f"count must be a non-negative integer, got {count!r}")
    _check(isinstance(canvas, int) and not isinstance(canvas, bool) and canvas >= DIGIT, f"canvas must be an integer of at least {DIGIT}, got {canvas!r}")
    _check(isinstance(max_objects, int) and not isinstance(max_objects, bool) and max_objects >= 0,
           f"max_objects must be a non-negative integer, got {max_objects!r}")
    _check(digits.ndim == 2 and digits.shape[1] == DIGIT * DIGIT, f"digits must be flat 28x28 images (M, 784), got shape {digits.shape}")
    _check(len(digits) > 0 or count * max_objects == 0, "no digits to compose canvases from")
    _check(bool(((digits == 0) | (digits == 1)).all()), "digits must be binary (0/1)")
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_objects + 1, size=count, dtype=np.int64)
    picks = rng.integers(0, max(len(digits), 1), size=(count, max_objects))
    offsets = rng.integers(0, canvas - DIGIT + 1, size=(count, max_objects, 2))
    source = digits.astype(np.uint8, copy=False).reshape(-1, DIGIT, DIGIT)
    images = np.zeros((count, canvas, canvas), np.uint8)
    span = np.arange(DIGIT)
    for k in range(max_objects):
        n = np.flatnonzero(counts > k)
        x, y = offsets[n, k, 0], offsets[n, k, 1]
        window = n[:, None, None], y[:, None, None] + span[None, :, None], x[:, None, None] + span[None, None, :]
        images[window] |= source[picks[n, k]]
    boxes = np.full((count, max_objects, 4), np.nan, np.float32)
    placed = np.arange(max_objects)[None, :] < counts[:, None]
    corner = np.concatenate([offsets[placed], np.zeros_like(offsets[placed])], axis=1)
    boxes[placed] = _ink_boxes(source[picks[placed]]) + corner
    return images.reshape(count, canvas * canvas), counts, boxes


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PyrovaeError(message)
