"""dSprites rendered by pyrovae: 64x64 binary sprites on the published factor grid.

The grid is Matthey et al.'s: 3 shapes (square, ellipse, heart) x 6 scales in [0.5, 1] x 40
orientations in [0, 2 pi] x 32 x 32 positions in [0, 1], every combination once, 737,280
images, in their row order (position y varies fastest, shape slowest). The raster is ours, not
DeepMind's file (which needs a download): a pixel is on when its centre lies inside the shape.
A sprite's centre is at ``0.2 + 0.6 * position`` of the canvas; at scale ``s`` its shape fits a
disc of radius ``0.2 * s`` canvas widths, so every sprite stays inside the canvas. Like the
original, orientations 0 and 2 pi (and the square's quarter turns, the ellipse's half turns)
draw the same image.

References:
    Matthey, Higgins, Hassabis & Lerchner (2017), dSprites: Disentanglement testing Sprites
    dataset, github.com/deepmind/dsprites-dataset (the factor grid and row order).
    Higgins et al. (2017), beta-VAE, ICLR, sec. 4 and appendix A.4 (the data set's design).
"""

from __future__ import annotations

import numpy as np

from pyrovae.errors import PyrovaeError

__all__ = ["FACTOR_NAMES", "FACTOR_SIZES", "GRID_SIZE", "SIDE", "DSprites", "checked", "factor_values", "grid_factors", "ink_area", "render", "validate"]

SIDE = 64
FACTOR_NAMES = ("shape", "scale", "orientation", "position_x", "position_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
GRID_SIZE = int(np.prod(FACTOR_SIZES))
SHAPES = ("square", "ellipse", "heart")
_REACH = 0.2  # the radius, in canvas widths, of the disc a sprite of scale 1 fits in
_CHUNK = 2048  # rows rendered at once: 2048 x 4096 float32 pixel coordinates, 32 MB each


def factor_values() -> tuple[np.ndarray, ...]:
    """The value of each factor's indices: shape 0..2, scale, orientation (radians), x, y."""
    return (np.arange(3.0), np.linspace(0.5, 1.0, 6), np.linspace(0.0, 2 * np.pi, 40), np.linspace(0.0, 1.0, 32), np.linspace(0.0, 1.0, 32))


def grid_factors(rows: np.ndarray | None = None) -> np.ndarray:
    """The factor indices ``int64 (n, 5)`` of grid rows (all 737,280 by default): row index in
    mixed radix, shape slowest, position y fastest."""
    rows = np.arange(GRID_SIZE) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= GRID_SIZE):
        raise PyrovaeError(f"dSprites rows must be in 0 .. {GRID_SIZE - 1}")
    return np.stack(np.unravel_index(rows, FACTOR_SIZES), axis=1).astype(np.int64)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether sprite-frame points (unit disc, v pointing down the image) lie in the shape."""
    if shape == 0:  # a square of half-side 0.7 (half-diagonal 0.99)
        return (np.abs(u) <= 0.7) & (np.abs(v) <= 0.7)
    if shape == 1:  # an ellipse with axes 0.95 and 0.48, the long one along u
        return (u / 0.95) ** 2 + (v / 0.48) ** 2 <= 1.0
    # the heart (a^2 + b^2 - 1)^3 <= a^2 b^3, lobes up: b spans [-1, 1.24] before the shift
    a, b = u / 0.7, 0.12 - v / 0.7
    return (a * a + b * b - 1.0) ** 3 <= a * a * b**3


def checked(factors: np.ndarray) -> np.ndarray:
    """`factors` as an array, refused in one line unless integer indices ``(n, 5)`` on the grid."""
    factors = np.asarray(factors)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_SIZES) or not np.issubdtype(factors.dtype, np.integer):
        raise PyrovaeError(f"dSprites factors must be integer indices of shape (n, {len(FACTOR_SIZES)}), got {factors.dtype} {factors.shape}")
    if len(factors) and ((factors < 0).any() or (factors >= np.array(FACTOR_SIZES)).any()):
        raise PyrovaeError(f"dSprites factor indices must lie below their sizes {FACTOR_SIZES}")
    return factors


def render(factors: np.ndarray) -> np.ndarray:
    """The images ``uint8 (n, 4096)`` of 0/1, row-major, of factor indices ``(n, 5)``."""
    factors = checked(factors)
    _, scales, angles, xs, ys = factor_values()
    centres = (np.arange(SIDE, dtype=np.float32) + 0.5) / SIDE
    py, px = (c.reshape(1, -1) for c in np.meshgrid(centres, centres, indexing="ij"))
    images = np.zeros((len(factors), SIDE * SIDE), dtype=np.uint8)
    for start in range(0, len(factors), _CHUNK):
        f = factors[start:start + _CHUNK]
        reach = (_REACH * scales[f[:, 1]]).astype(np.float32)[:, None]
        dx = (px - (0.2 + 0.6 * xs[f[:, 3]]).astype(np.float32)[:, None]) / reach
        dy = (py - (0.2 + 0.6 * ys[f[:, 4]]).astype(np.float32)[:, None]) / reach
        cos, sin = (g(angles[f[:, 2]]).astype(np.float32)[:, None] for g in (np.cos, np.sin))
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        for shape in range(len(SHAPES)):
            rows = np.flatnonzero(f[:, 0] == shape)
            if len(rows):
                images[start + rows] = _inside(shape, u[rows], v[rows])
    return images


def ink_area(shape: int, scale: float) -> float:
    """The shape's area in pixels at `scale`, by quadrature on a fine grid (for validation)."""
    t = (np.arange(800) + 0.5) / 400 - 1.0
    u, v = np.meshgrid(t, t)
    return float(_inside(shape, u, v).mean() * 4.0 * (_REACH * scale * SIDE) ** 2)


def validate(images: np.ndarray) -> None:
    """Refuse, in one line, a full grid that is not dSprites: its count, and per shape and scale
    the mean ink against the shape's area (the factor grid is the row order, by construction)."""
    if images.shape != (GRID_SIZE, SIDE * SIDE) or images.dtype != np.uint8:
        raise PyrovaeError(f"dSprites grid must be uint8 ({GRID_SIZE}, {SIDE * SIDE}), got {images.dtype} {images.shape}")
    block = GRID_SIZE // (FACTOR_SIZES[0] * FACTOR_SIZES[1])  # rows of one shape and scale
    scales = factor_values()[1]
    for shape in range(FACTOR_SIZES[0]):
        for i, scale in enumerate(scales):
            start = (shape * FACTOR_SIZES[1] + i) * block
            ink = images[start:start + block:97].sum(axis=1, dtype=np.int64)  # a stride prime to the inner sizes
            expected = ink_area(shape, scale)
            if ink.min() == 0 or abs(ink.mean() / expected - 1.0) > 0.03:
                raise PyrovaeError(f"dSprites grid is damaged: {SHAPES[shape]}s at scale {scale:.1f} hold {ink.mean():.1f} pixels on average, "
                                   f"not about {expected:.1f} (or some are empty): delete the cache entry and rebuild it")


class DSprites:
    """The grid as ground-truth data for the disentanglement metrics (`pyrovae.disentanglement`):
    its factor sizes, and the float32 rows of factor indices, looked up in the bit-packed grid
    ``(737280, 512)`` where one is given (the metrics draw about a million), else rendered."""

    factor_sizes = FACTOR_SIZES
    factor_names = FACTOR_NAMES

    def __init__(self, packed: np.ndarray | None = None) -> None:
        self.packed = packed

    def observe(self, factors: np.ndarray) -> np.ndarray:
        if self.packed is None:
            return render(factors).astype(np.float32)
        rows = np.ravel_multi_index(tuple(checked(factors).T), FACTOR_SIZES)
        return np.unpackbits(self.packed[rows], axis=1).astype(np.float32)
