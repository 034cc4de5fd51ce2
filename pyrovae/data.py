"""Data sets held in memory as tensors and batched by index.

Images are stored flat and compact (``uint8``); :meth:`Dataset.batch` turns rows into ``float32``
model input. Splits are fixed: a loader returns the same rows for a split every time.

A data directory (:func:`data_dir`) is only read, except for the downloads it is asked to hold:
a read-only or shared one that already holds the files works, and one that lacks them is
refused in one line before anything is fetched. Converted files (binarized MNIST, bit-packed)
go to :func:`cache_dir`, named by a hash of their source's path, size and modification time.

References:
    Larochelle & Murray, *The Neural Autoregressive Distribution Estimator*, AISTATS 2011,
    Section 4 (static binarized MNIST, 50k/10k/10k).
    Boulanger-Lewandowski, Bengio & Vincent, *Modeling Temporal Dependencies in High-Dimensional
    Sequences*, ICML 2012, Section 6 (JSB chorales as 88-key piano rolls).
    Eslami et al., *Attend, Infer, Repeat*, NeurIPS 2016, Section 3.1 (multi-MNIST: 50x50
    canvases of 0-2 digits, composed by `pyrovae.multi_mnist`).
    Matthey et al., *dSprites*, 2017 (the factor grid, rendered by `pyrovae.dsprites`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import inspect
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyrovae import dsprites
from pyrovae.batch import UNLABELLED, Batch
from pyrovae.errors import PyrovaeError
from pyrovae.multi_mnist import compose
from pyrovae.registry import DATASETS

__all__ = ["UNLABELLED", "Split", "Dataset", "load_dataset", "data_dir", "cache_dir", "minibatches", "semi_supervised", "stratified_minibatches"]

SPLITS = ("train", "valid", "test")
FIELDS = ("x", "y", "lengths", "mask")
_TIMEOUT = 60.0
_CUSTOM_SUFFIXES = (".npy", ".npz", ".pt", ".pth")


@dataclass(frozen=True)
class Split:
    """One split: ``x`` of shape ``(N, *event_shape)``, optional labels ``y`` and ``lengths``, and
    for scenes of objects optional ``boxes`` ``(N, max_objects, 4)``: each object's ``(x0, y0,
    width, height)`` in pixels, NaN rows beyond its count (kept on the CPU); for data generated
    from known factors of variation their indices ``factors`` ``(N, K)`` (dSprites); for rows that
    are a posterior's means its standard deviations ``noise``, from which every batch draws."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    noise: torch.Tensor | None = None  # per-example standard deviations: a batch draws x + noise * N(0, 1) (M1's posterior, for M1+M2)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A named data set: its splits, event shape and kind (``binary``, ``grayscale``, ``sequence``)."""

    name: str
    splits: dict[str, Split]
    event_shape: tuple[int, ...]
    kind: str
    image_shape: tuple[int, int] | None = None
    dynamic_binarization: bool = False
    fields: tuple[str, ...] = ("x",)  # what `batch` gives a model, in order (see `with_fields`)
    collate: Callable[[tuple, dict], tuple[tuple, dict]] | None = None  # derived arguments (`pyrovae.batch.Batch`)
    omit_unlabelled: bool = False  # unlabelled examples are called without their label y (`pyrovae.batch.Batch.omit`)
    ground_truth: Any = None  # observations rendered from known factors (`pyrovae.disentanglement.FactorData`): dSprites

    def split(self, name: str) -> Split:
        """Returns the split ``name``, or raises naming the splits this data set has."""
        have = ", ".join(self.splits) or "none"
        _require(name in self.splits, f"data set {self.name!r} has no {name!r} split; choose from: {have}")
        return self.splits[name]

    def with_fields(self, fields: str | tuple[str, ...]) -> Dataset:
        """The same data set giving ``fields`` (of ``x``, ``y``, ``lengths``, ``mask``) as a
        model's positional arguments: ``("x", "y")`` for ``model(xs, ys)``, ``("x", "mask")`` for
        padded sequences."""
        names = tuple(f.strip() for f in fields.split(",")) if isinstance(fields, str) else tuple(fields)
        unknown = [f for f in names if f not in FIELDS]
        _require(bool(names) and not unknown, f"unknown data field(s) {', '.join(map(repr, unknown)) or 'none given'}: choose from {', '.join(FIELDS)}")
        _require(len(set(names)) == len(names), f"data fields repeat: {','.join(names)}")
        if "y" in names:
            missing = [k for k, part in self.splits.items() if part.y is None]
            _require(not missing, f"data set {self.name!r} has no labels (y) in its {', '.join(missing)} split(s)")
        if "lengths" in names or "mask" in names:
            _require(self.kind == "sequence", f"data set {self.name!r} holds no sequences: it has no lengths or mask")
        return replace(self, fields=names)

    def omitting_unlabelled(self) -> Dataset:
        """The same data set calling a program on its unlabelled examples without the label
        field, as ``model(xs, ys=None)`` expects (`pyrovae.batch.Batch.groups`)."""
        _require("y" in self.fields and self.fields[-1] == "y", f"leaving labels out of unlabelled examples needs y as the last data field (--fields x,y), not {','.join(self.fields)}")
        return replace(self, omit_unlabelled=True)

    def first_rows(self, split: str, count: int) -> torch.Tensor:
        """The indices of up to `count` examples of `split` to trace a program on: the first ones,
        or where unlabelled examples are called apart, the first of each group in turn (so that
        a trace sees both calls)."""
        size = len(self.split(split))
        if not self.omit_unlabelled:
            return torch.arange(min(size, count))
        unlabelled = self.split(split).y == UNLABELLED
        have, lack = (~unlabelled).nonzero().squeeze(-1), unlabelled.nonzero().squeeze(-1)
        half = min(len(have), max(count // 2, count - len(lack)))
        return torch.cat([have[:half], lack[: count - half]]).sort().values

    def batch(self, split: str, index: torch.Tensor, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> torch.Tensor | Batch:
        """Returns the model input for rows ``index`` of ``split``: the ``float32`` rows, or with
        several `fields` a `pyrovae.batch.Batch` of them in order.

        Binary rows become {0, 1}, grayscale ``uint8`` rows ``x / 255``, and with dynamic
        binarization each pixel is drawn from ``Bernoulli(x / 255)`` using ``generator``.
        Labels are ``int64``; masks ``bool`` ``(B, T_max)``; lengths ``int64``.
        """
        x = self._rows(split, index, generator, device)
        if self.fields == ("x",) and self.collate is None:
            return x
        part, rows = self.split(split), torch.as_tensor(index, dtype=torch.long)
        values = {
            "x": lambda: x,
            "y": lambda: part.y[rows.to(part.y.device)].long().to(x.device),
            "lengths": lambda: part.lengths[rows.cpu()].long().to(x.device),
            "mask": lambda: self.mask(split, rows, x.device),
        }
        return Batch(tuple(values[f]() for f in self.fields), {}, self.collate, len(self.fields) - 1 if self.omit_unlabelled else None)

    def _rows(self, split: str, index: torch.Tensor, generator: torch.Generator | None, device: torch.device | str | None) -> torch.Tensor:
        rows = self.split(split).x
        x = rows[torch.as_tensor(index, dtype=torch.long).to(rows.device)]
        scale = x.dtype == torch.uint8 and (self.kind == "grayscale" or self.dynamic_binarization)
        x = x.float() / 255.0 if scale else x.float()
        if self.dynamic_binarization and x.device.type == "cpu":
            x = torch.bernoulli(x, generator=generator)
        elif self.dynamic_binarization:  # the generator is the CPU's: draw there, compare here
            x = (torch.rand(x.shape, generator=generator).to(x.device) < x).float()
        noise = self.split(split).noise
        if noise is not None and split == "train":  # one draw of each row's posterior, by the batch's generator (on the CPU); held-out rows: the means
            x = x + noise[torch.as_tensor(index, dtype=torch.long).to(noise.device)].to(x.device) * torch.randn(x.shape, generator=generator).to(x.device)
        return x.to(device) if device is not None else x

    @property
    def device(self) -> torch.device:
        """Where the training rows are held."""
        return next(iter(self.splits.values())).x.device

    def to(self, device: torch.device | str) -> Dataset:
        """The same data set with its rows (``x``, kept compact) on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        return replace(self, splits={name: replace(part, x=part.x.to(device), noise=None if part.noise is None else part.noise.to(device))
                                     for name, part in self.splits.items()})

    def mask(self, split: str, index: torch.Tensor,
             device: torch.device | str | None = None) -> torch.Tensor | None:
        """Returns the ``(B, T_max)`` bool mask of real time steps for sequences, else ``None``."""
        lengths = self.split(split).lengths
        if self.kind != "sequence" or lengths is None:
            return None
        lengths = lengths[torch.as_tensor(index, dtype=torch.long).cpu()]
        mask = torch.arange(self.event_shape[0]) < lengths[:, None]
        return mask.to(device) if device is not None else mask


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Returns the data directory: ``explicit``, else ``$PYROVAE_DATA``, else ``~/.cache/pyrovae``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("PYROVAE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyrovae"


_resolve_dir = data_dir  # load_dataset's argument shadows the function name


def cache_dir() -> Path:
    """Returns where converted data sets are cached: ``$PYROVAE_CACHE``, else the user cache directory.

    The user cache directory is ``$XDG_CACHE_HOME/pyrovae`` (``~/.cache/pyrovae``) on Linux,
    ``~/Library/Caches/pyrovae`` on macOS and ``%LOCALAPPDATA%\\pyrovae\\Cache`` on Windows. Only
    derived files go there (a cache entry is named by its source, so deleting any is safe);
    nothing is ever written into a data directory except the downloads asked of it.
    """
    env = os.environ.get("PYROVAE_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "pyrovae" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pyrovae"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "pyrovae"


def minibatches(num_examples: int, batch_size: int, generator: torch.Generator, shuffle: bool = True,
                drop_last: bool = False, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """Yields ``int64`` index tensors covering ``range(num_examples)`` once (one epoch).

    The order is drawn by ``generator`` (on the CPU) and moved to ``device`` once per epoch."""
    _require(batch_size >= 1, f"batch size must be a positive integer, got {batch_size}")
    order = torch.randperm(num_examples, generator=generator) if shuffle else torch.arange(num_examples)
    order = order.to(device) if device is not None else order
    stop = num_examples - num_examples % batch_size if drop_last else num_examples
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def stratified_minibatches(labelled: torch.Tensor, batch_size: int, labelled_per_batch: int, generator: torch.Generator,
                           device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of minibatches of `labelled_per_batch` labelled and ``batch_size -
    labelled_per_batch`` unlabelled examples (``labelled``: a bool per example), as Kingma et
    al. (2014) train M2: the epoch covers the unlabelled examples once, the labelled ones are
    drawn in shuffled passes as often as needed.

    Yields ``(index, weights)``: with the plate's own scale N / B, the weight of each example
    makes the minibatch an unbiased estimate of the sum over the data set (stratified sampling:
    N_labelled / K per labelled example, N_unlabelled / B_u per unlabelled one)."""
    labelled = labelled.cpu()
    have, lack = labelled.nonzero().squeeze(-1), (~labelled).nonzero().squeeze(-1)
    unlabelled_per_batch = batch_size - labelled_per_batch
    _require(0 < labelled_per_batch < batch_size, f"labelled examples per batch must be in 1..{batch_size - 1}, got {labelled_per_batch}")
    _require(len(have) > 0 and len(lack) > 0, "stratified minibatches need both labelled and unlabelled training examples")
    steps = math.ceil(len(lack) / unlabelled_per_batch)
    passes = math.ceil(steps * labelled_per_batch / len(have))
    drawn = torch.cat([have[torch.randperm(len(have), generator=generator)] for _ in range(passes)])
    order = lack[torch.randperm(len(lack), generator=generator)]
    num = len(labelled)
    for step in range(steps):
        rows_u = order[step * unlabelled_per_batch : (step + 1) * unlabelled_per_batch]
        rows_l = drawn[step * labelled_per_batch : (step + 1) * labelled_per_batch]
        plate = num / (len(rows_l) + len(rows_u))
        weights = torch.cat([torch.full((len(rows_l),), len(have) / len(rows_l)), torch.full((len(rows_u),), len(lack) / len(rows_u))]) / plate
        index = torch.cat([rows_l, rows_u])
        yield (index, weights) if device is None else (index.to(device), weights.to(device))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options: Any) -> Dataset:
    """Loads a registered data set, or a user's ``.npy``/``.npz``/``.pt`` file given by path.

    Args:
        name: a name in ``DATASETS`` or a path to an ``(N, D)`` or ``(N, H, W)`` array file.
        data_dir: where data files are read and downloaded (see :func:`data_dir`).
        options: loader options, e.g. ``binarize=False`` or ``seed=1``.
    """
    key = os.fspath(name)
    if key in DATASETS:
        loader: Callable[..., Dataset] = DATASETS.get(key)
        fixed: dict[str, Any] = {"data_dir": _resolve_dir(data_dir)}
    elif Path(key).suffix.lower() in _CUSTOM_SUFFIXES or os.path.isfile(key):
        loader, fixed = _load_custom, {"path": Path(key).expanduser()}
    else:
        DATASETS.get(key)  # raises, suggesting close matches
        raise AssertionError("unreachable")
    accepted = [p for p in inspect.signature(loader).parameters if p not in fixed]
    for option in options:
        takes = ", ".join(accepted) or "no options"
        _require(option in accepted, f"unknown option {option!r} for data set {key!r}; it takes: {takes}")
    return loader(**fixed, **options)


# File helpers

def _first_line(err: object) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise PyrovaeError(message)


def _corrupt(what: str, where: str, problem: str) -> PyrovaeError:
    return PyrovaeError(f"{what} file {where} is corrupt: {problem}; delete it (a download fetches it "
                        "again) or replace it with the canonical file")


def _read_bytes(path: Path, where: str) -> bytes:
    """Reads a file, gunzipping it when it starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as err:
        raise PyrovaeError(f"cannot read {where} ({_first_line(err)}); delete or replace it") from None


_CACHE_FORMAT = 1  # bump when a cached array's layout changes: old entries are then ignored


def _cache_entry(dataset: str, stem: str, source: Path) -> tuple[Path, str]:
    """The cache file of ``source``'s conversion, and the prefix its older entries share.

    The name holds a hash of the resolved source path (two data directories never share an
    entry) and one of its size, modification time and inode (a changed source misses).
    """
    st = source.stat()
    where = hashlib.sha256(os.fsencode(source.resolve())).hexdigest()[:16]
    what = hashlib.sha256(f"{_CACHE_FORMAT}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()[:16]
    prefix = f"{stem}-{where}-"
    return cache_dir() / dataset / f"{prefix}{what}.npy", prefix


def _load_cache(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array at ``path`` if it has ``dtype`` and ``shape``; ``None`` if missing or damaged."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # missing or corrupt: convert the source again
    return array if array.dtype == dtype and array.shape == shape else None


def _save_cache(path: Path, array: np.ndarray, stale_prefix: str | None = None) -> None:
    """Writes ``array`` to ``path`` atomically and removes entries of older versions of its source
    (names starting with ``stale_prefix``); an unwritable cache only costs speed."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        for old in path.parent.glob(f"{stale_prefix}*.npy") if stale_prefix else ():
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as err:
        warnings.warn(f"could not write cache {path} (set PYROVAE_CACHE to a writable directory): "
                      f"{_first_line(err)}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def _target_dir(path: Path, missing: str) -> Iterator[Path]:
    """Creates ``path`` for downloads; removes what it created if the block fails and left it empty.

    A data directory that exists but cannot be written is refused before any download, naming
    the ``missing`` files: it may be read-only or shared, and is never used as scratch space.
    """
    created = [p for p in (path, *path.parents) if not p.exists()]
    existing = path.parents[len(created) - 1] if created else path
    if existing.is_dir() and not os.access(existing, os.W_OK):
        raise PyrovaeError(f"data directory {existing} is read-only and lacks {missing}; place the files in "
                           f"{path}, or pass a writable --data-dir or set PYROVAE_DATA to download them")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PyrovaeError(f"cannot create data directory {path} ({_first_line(err)}) to download {missing}; "
                           "place the files there, or pass a writable --data-dir or set PYROVAE_DATA") from None
    try:
        yield path
    except BaseException:
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break
        raise


class _FetchError(Exception):
    def __init__(self, reasons: list[str], not_found: bool) -> None:
        super().__init__("; ".join(reasons))
        self.not_found = not_found


def _download(candidates: list[tuple[str, Path]], parse: Callable[[Path, str], Any]) -> tuple[Any, Path]:
    """Fetches the first candidate ``(url, dest)`` that downloads and parses; returns (parsed, dest).

    Each download goes to a temporary file beside ``dest``, is parsed there, and only then is
    moved into place with :func:`os.replace`, so a failure or Ctrl-C leaves no partial file.
    """
    reasons, not_found = [], True
    for url, dest in candidates:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
                shutil.copyfileobj(response, out, 1 << 20)
            value = parse(Path(tmp), url)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
            return value, dest
        except urllib.error.HTTPError as err:
            reasons.append(f"{url}: HTTP {err.code}")
            not_found &= err.code in (404, 410)
        except (urllib.error.URLError, OSError, http.client.HTTPException, PyrovaeError) as err:
            reason = getattr(err, "reason", err)
            reasons.append(f"{url}: {_first_line(reason)}")
            not_found &= isinstance(reason, FileNotFoundError)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise _FetchError(reasons, not_found)


def _base_url(option: str | None, env: str, default: str) -> tuple[str, bool]:
    """Returns (base URL ending in '/', whether the user chose it); a plain path becomes file://."""
    url = (chosen := option or os.environ.get(env)) or default
    if "://" not in url:
        url = Path(url).expanduser().resolve().as_uri()
    return url.rstrip("/") + "/", bool(chosen)


def _fixed_split(n: int, sizes: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    """A seeded permutation cut into train/valid/test (legacy RandomState: stable across NumPy)."""
    _require(isinstance(seed, int) and not isinstance(seed, bool), f"seed must be an integer, got {seed!r}")
    parts = np.split(np.random.RandomState(seed).permutation(n), np.cumsum(sizes)[:-1])
    return {k: v for k, v in zip(SPLITS, parts, strict=True) if len(v)}


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).copy())


# Semi-supervised protocols


def semi_supervised(data: Dataset, labels: int, seed: int = 0) -> Dataset:
    """`data` with `labels` labels kept in its train split, drawn class-balanced with `seed`
    (the remainder of labels // classes to the lowest classes), the other training labels and
    those of the valid split set to UNLABELLED (its bound is then one on log p(x)); the test
    split keeps its labels, for the classification error (Kingma et al. 2014, sec. 4.1)."""
    train = data.split("train")
    _require(train.y is not None, f"data set {data.name!r} has no labels to keep")
    assert train.y is not None
    classes = sorted(torch.unique(train.y).tolist())
    _require(isinstance(labels, int) and not isinstance(labels, bool) and len(classes) <= labels <= len(train),
             f"labels must be a whole number from {len(classes)} (one per class) to {len(train)}, got {labels!r}")
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for i, c in enumerate(classes):
        pool = torch.nonzero(train.y == c).flatten()
        want = labels // len(classes) + (i < labels % len(classes))
        _require(want <= len(pool), f"class {c} has {len(pool)} training examples, fewer than the {want} labels asked of it")
        keep.append(pool[torch.randperm(len(pool), generator=generator)[:want]])
    y = torch.full_like(train.y, UNLABELLED)
    kept = torch.cat(keep)
    y[kept] = train.y[kept]
    splits = {**data.splits, "train": replace(train, y=y)}
    if "valid" in splits and splits["valid"].y is not None:
        splits["valid"] = replace(splits["valid"], y=torch.full_like(splits["valid"].y, UNLABELLED))
    return replace(data, name=f"{data.name} ({labels} labels)", splits=splits)


# Digits

@DATASETS.register("digits", "scikit-learn's bundled 8x8 handwritten digits, 1797 images with labels")
def _load_digits(data_dir: Path, binarize: bool = True, seed: int = 0, labels: int | None = None) -> Dataset:
    """Fixed seeded split 1197/300/300; binary pixels are ``value >= 8`` of 0..16. With
    ``labels=N``, the semi-supervised protocol of `semi_supervised` (N labels kept)."""
    from sklearn.datasets import load_digits

    _require(isinstance(binarize, bool), f"digits option binarize must be true or false, got {binarize!r}")
    bunch = load_digits()
    values, targets = bunch.data, bunch.target.astype(np.int64)
    x = (values >= 8).astype(np.uint8) if binarize else np.rint(values * 255 / 16).astype(np.uint8)
    parts = _fixed_split(len(x), (1197, 300, 300), seed)
    splits = {k: Split(_tensor(x[i]), _tensor(targets[i])) for k, i in parts.items()}
    data = Dataset("digits", splits, (64,), "binary" if binarize else "grayscale", (8, 8))
    return data if labels is None else semi_supervised(data, labels, seed)


# binarized MNIST

_BMNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_BMNIST_ROWS = {"train": 50000, "valid": 10000, "test": 10000}


def _parse_amat(rows: int, path: Path, where: str | None = None) -> np.ndarray:
    """Parses an ``.amat`` file of 0/1 rows (784 values a line) into ``uint8`` ``(rows, 784)``."""
    where = where or str(path)
    corrupt = functools.partial(_corrupt, "binarized-MNIST", where)
    data = _read_bytes(path, where)
    if data and not data.endswith(b"\n"):
        data += b"\n"
    buf, width = np.frombuffer(data, np.uint8), 2 * 784
    grid = buf.reshape(-1, width) if buf.size % width == 0 else None
    if grid is not None and (grid[:, 1:-1:2] == ord(" ")).all() and (grid[:, -1] == ord("\n")).all():
        x = grid[:, ::2] - np.uint8(ord("0"))  # canonical layout: fixed width, vectorized
        bad = np.argwhere(x > 1)
        if len(bad):
            r, c = bad[0]
            raise corrupt(f"line {r + 1} holds {chr(grid[r, 2 * c])!r}, expected only 0/1 values")
    else:
        lines = []
        for i, line in enumerate(data.splitlines(), 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 784:
                raise corrupt(f"line {i} has {len(tokens)} values, expected 784")
            joined = b"".join(tokens)
            if len(joined) != 784 or joined.strip(b"01"):
                raise corrupt(f"line {i} holds a value other than 0/1")
            lines.append(joined)
        x = np.frombuffer(b"".join(lines), np.uint8).reshape(-1, 784) - np.uint8(ord("0"))
    if x.shape[0] != rows:
        raise corrupt(f"it has {x.shape[0]} rows, expected {rows}")
    return x


def _bmnist_cached(source: Path, split: str, parsed: np.ndarray | None = None) -> np.ndarray:
    """The split converted from ``source``: from the cache when it holds this version of the
    source, else parsed (or ``parsed``, when the caller just did) and cached, bit-packed."""
    rows, stem = _BMNIST_ROWS[split], f"binarized_mnist_{split}"
    entry, prefix = _cache_entry("binarized-mnist", stem, source)
    if parsed is None:
        if (packed := _load_cache(entry, np.dtype(np.uint8), (rows, 98))) is not None:
            return np.unpackbits(packed, axis=1)
        parsed = _parse_amat(rows, source)
    _save_cache(entry, np.packbits(parsed, axis=1), prefix)
    return parsed


def _bmnist_local(directory: Path, split: str) -> np.ndarray | None:
    """Loads a split from the ``.amat`` (or ``.amat.gz``) in ``directory``, through the cache;
    ``None`` if neither is there. Only reads ``directory``."""
    stem = f"binarized_mnist_{split}"
    source = next((p for p in (directory / f"{stem}.amat", directory / f"{stem}.amat.gz") if p.is_file()), None)
    return None if source is None else _bmnist_cached(source, split)


@DATASETS.register("binarized-mnist", "static binarized MNIST (Larochelle & Murray), 50k/10k/10k, downloaded")
def _load_binarized_mnist(data_dir: Path, base_url: str | None = None) -> Dataset:
    """Reads ``binarized_mnist_{split}.amat[.gz]`` from the data directory, downloading if needed."""
    sub, arrays = data_dir / "binarized_mnist", {}
    for split in SPLITS:
        for directory in (sub, data_dir):
            if (x := _bmnist_local(directory, split)) is not None:
                arrays[split] = x
                break
    if "train" not in arrays or "valid" not in arrays:
        url, _ = _base_url(base_url, "PYROVAE_BINARIZED_MNIST_URL", _BMNIST_URL)
        missing = ", ".join(f"binarized_mnist_{s}.amat[.gz]" for s in ("train", "valid") if s not in arrays)
        with _target_dir(sub, missing):
            for split in (s for s in SPLITS if s not in arrays):
                stem, rows = f"binarized_mnist_{split}", _BMNIST_ROWS[split]
                candidates = [(url + stem + ext, sub / (stem + ext)) for ext in (".amat", ".amat.gz")]
                try:
                    x, dest = _download(candidates, functools.partial(_parse_amat, rows))
                    arrays[split] = _bmnist_cached(dest, split, x)
                except _FetchError as err:
                    if split == "test":  # the test split is often withheld
                        continue
                    raise PyrovaeError(
                        f"could not download binarized-MNIST {split} split from {url} ({err}); place "
                        f"binarized_mnist_{{train,valid}}.amat (or .amat.gz) in {sub}, or set base_url "
                        "/ PYROVAE_BINARIZED_MNIST_URL") from None
    splits = {k: Split(torch.from_numpy(arrays[k])) for k in SPLITS if k in arrays}
    return Dataset("binarized-mnist", splits, (784,), "binary", (28, 28))


# multi-MNIST

@DATASETS.register("multi-mnist", "50x50 canvases of 0-2 binarized-MNIST digits with their counts (y) and boxes, for AIR (Eslami et al. 2016)")
def _load_multi_mnist(data_dir: Path, base_url: str | None = None, canvases: int | None = None, seed: int = 0) -> Dataset:
    """Composes each split's canvases from the binarized-MNIST digits of that split only, seeded
    ``3 * seed + i`` for the i-th of train/valid/test; ``canvases`` per split, by default as many
    as the split has digits. The labels ``y`` are the digit counts."""
    _require(canvases is None or (isinstance(canvases, int) and not isinstance(canvases, bool) and canvases >= 1),
             f"multi-mnist option canvases must be a positive integer, got {canvases!r}")
    _require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, f"multi-mnist option seed must be a non-negative integer, got {seed!r}")
    digits = _load_binarized_mnist(data_dir, base_url)
    splits = {}
    for name, part in digits.splits.items():
        images, counts, boxes = compose(part.x.numpy(), canvases or len(part), 3 * seed + SPLITS.index(name))
        splits[name] = Split(torch.from_numpy(images), y=torch.from_numpy(counts), boxes=torch.from_numpy(boxes))
    return Dataset("multi-mnist", splits, (2500,), "binary", (50, 50))


# dSprites

_DSPRITES_VALID = 0.1  # the share of the chosen grid rows held out as the valid split


def _dsprites_entry() -> tuple[Path, np.dtype, tuple[int, int]]:
    return cache_dir() / "dsprites" / f"grid-{_CACHE_FORMAT}.npy", np.dtype(np.uint8), (dsprites.GRID_SIZE, dsprites.SIDE**2 // 8)


def _dsprites_cached() -> np.ndarray | None:
    """The cached bit-packed grid if it holds what the renderer draws now (64 seeded rows
    compared bit for bit: a grid of an older renderer, or damaged, is not used), else None."""
    packed = _load_cache(*_dsprites_entry())
    if packed is None:
        return None
    rows = np.random.RandomState(0).choice(dsprites.GRID_SIZE, 64, replace=False)
    return packed if np.array_equal(np.unpackbits(packed[rows], axis=1), dsprites.render(dsprites.grid_factors(rows))) else None


def _dsprites_grid() -> tuple[np.ndarray, np.ndarray]:
    """The full grid's images ``uint8 (737280, 4096)`` and their bit-packed rows (377 MB): from
    the cache, else rendered (about 80 s) and cached; validated either way."""
    path, _, _ = _dsprites_entry()
    packed = _dsprites_cached()
    fresh = packed is None
    if packed is None:
        packed = np.packbits(dsprites.render(dsprites.grid_factors()), axis=1)
    images = np.unpackbits(packed, axis=1)
    dsprites.validate(images)
    if fresh:
        _save_cache(path, packed)
    return images, packed


@DATASETS.register("dsprites", "737,280 64x64 binary sprites on dSprites' factor grid (shape, scale, orientation, x, y), rendered by pyrovae")
def _load_dsprites(data_dir: Path, examples: int | None = None, seed: int = 0) -> Dataset:
    """The grid rows, or ``examples`` of them drawn without replacement with ``seed`` (rendered
    directly, no cache); a seeded tenth of them is the valid split, the rest train. Each split
    carries the rows' factor indices (`pyrovae.dsprites.FACTOR_NAMES`). The ground truth the
    disentanglement metrics draw from is the whole grid: looked up in the cached grid where a
    full load has built it, else rendered (the same images, more slowly)."""
    _require(examples is None or (isinstance(examples, int) and not isinstance(examples, bool) and 10 <= examples <= dsprites.GRID_SIZE),
             f"dsprites option examples must be a whole number from 10 to {dsprites.GRID_SIZE}, got {examples!r}")
    _require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, f"dsprites option seed must be a non-negative integer, got {seed!r}")
    if examples is None:
        rows, (images, packed) = np.arange(dsprites.GRID_SIZE), _dsprites_grid()
        truth = dsprites.DSprites(packed)
    else:
        rows = np.sort(np.random.RandomState(seed).choice(dsprites.GRID_SIZE, examples, replace=False))
        images, truth = dsprites.render(dsprites.grid_factors(rows)), dsprites.DSprites(_dsprites_cached())
    valid = int(round(_DSPRITES_VALID * len(rows)))
    parts = _fixed_split(len(rows), (len(rows) - valid, valid, 0), seed)
    factors = dsprites.grid_factors(rows)
    splits = {k: Split(torch.from_numpy(images[np.sort(i)]), factors=torch.from_numpy(factors[np.sort(i)])) for k, i in parts.items()}
    return Dataset("dsprites", splits, (dsprites.SIDE**2,), "binary", (dsprites.SIDE, dsprites.SIDE), ground_truth=truth)


# MNIST (IDX)

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}


def _parse_idx(count: int, images: bool, path: Path, where: str | None = None) -> np.ndarray:
    """Parses an IDX file of ``count`` 28x28 ``uint8`` images, or of ``count`` labels 0..9."""
    where = where or str(path)
    data = _read_bytes(path, where)
    ndim, expected = (3, [count, 28, 28]) if images else (1, [count])
    header, corrupt = 4 + 4 * ndim, functools.partial(_corrupt, "MNIST", where)
    if len(data) < header or int.from_bytes(data[:4], "big") != 0x800 + ndim:
        raise corrupt(f"bad magic number, expected an IDX file of {ndim}-D unsigned bytes")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if dims != expected:
        raise corrupt(f"its header gives shape {dims}, expected {expected}")
    body = np.frombuffer(data, np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise corrupt(f"it holds {body.size} data bytes, expected {int(np.prod(dims))}")
    if not images and body.max(initial=0) > 9:
        raise corrupt("it holds a label outside 0..9")
    return body.reshape(count, 784).copy() if images else body.astype(np.int64)


def _torchvision_mnist_mirrors() -> list[str]:
    """torchvision's MNIST mirrors when torchvision imports (optional; it may not match this torch)."""
    try:
        from torchvision.datasets import MNIST  # type: ignore[import-not-found]

        return [str(m).rstrip("/") + "/" for m in getattr(MNIST, "mirrors", [])]
    except Exception:
        return []


@DATASETS.register("mnist", "grayscale MNIST with labels (IDX files), train 50k / valid 10k / test 10k")
def _load_mnist(data_dir: Path, binarize: str | None = None, base_url: str | None = None) -> Dataset:
    """Reads the raw IDX files; train = first 50,000 of the training file, valid = the last 10,000."""
    _require(binarize in (None, "dynamic"), f"mnist option binarize is 'dynamic' or None, not {binarize!r}")
    dirs, raw = (data_dir / "MNIST" / "raw", data_dir / "mnist", data_dir), data_dir / "MNIST" / "raw"

    def find(stem: str) -> Path | None:
        return next((d / n for d in dirs for n in (stem, stem + ".gz") if (d / n).is_file()), None)

    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (images, labels, count) in _MNIST_FILES.items():
        found = find(images), find(labels)
        if all(found):
            arrays[split] = _parse_idx(count, True, found[0]), _parse_idx(count, False, found[1])
        elif any(found):
            raise PyrovaeError(f"found {found[0] or found[1]} but not its partner "
                               f"{labels if found[0] else images}[.gz]; place both files in {dirs[0]}")
    if not arrays:
        url, chosen = _base_url(base_url, "PYROVAE_MNIST_URL", _MNIST_URL)
        bases = [url] if chosen else list(dict.fromkeys([url, *_torchvision_mnist_mirrors()]))
        reasons = []
        with _target_dir(raw, "train-*/t10k-*-ubyte[.gz]"):
            for split, (images, labels, count) in _MNIST_FILES.items():
                try:
                    pair = []
                    for stem, is_images in ((images, True), (labels, False)):
                        urls = [(b + stem + ext, raw / (stem + ext)) for b in bases for ext in (".gz", "")]
                        pair.append(_download(urls, functools.partial(_parse_idx, count, is_images)))
                    arrays[split] = pair[0][0], pair[1][0]
                except _FetchError as err:
                    for _, dest in pair:  # an images file without its labels is of no use
                        dest.unlink(missing_ok=True)
                    reasons.append(f"{split}: {err}")
            if not arrays:
                raise PyrovaeError(f"no MNIST IDX files in {data_dir} and the download from {url} failed "
                                   f"({'; '.join(reasons)}); place train-*/t10k-*-ubyte[.gz] in {raw}")
        if reasons:
            warnings.warn(f"MNIST: some splits could not be downloaded ({'; '.join(reasons)})", stacklevel=3)
    splits = {}
    if "train" in arrays:
        x, y = arrays["train"]
        splits["train"] = Split(torch.from_numpy(x[:50000]), torch.from_numpy(y[:50000]))
        splits["valid"] = Split(torch.from_numpy(x[50000:]), torch.from_numpy(y[50000:]))
    if "test" in arrays:
        splits["test"] = Split(*map(torch.from_numpy, arrays["test"]))
    dynamic = binarize == "dynamic"
    return Dataset("mnist", splits, (784,), "binary" if dynamic else "grayscale", (28, 28), dynamic)


# The semi-supervised MNIST protocol

@DATASETS.register("mnist-semi", "semi-supervised MNIST: 50k unlabelled binarized-MNIST images, N labels and a test set from the t10k halves")
def _load_mnist_semi(data_dir: Path, labels: int = 100, seed: int = 0) -> Dataset:
    """The fixed protocol of Kingma et al. (2014)'s semi-supervised MNIST task, built from the
    static binarized MNIST train/valid splits and the labelled MNIST t10k images:

    - the t10k images are split once, by a permutation seeded 0, into a labelled pool (first
      5,000) and the test set (last 5,000), and binarized by sampling Bernoulli(pixel / 255)
      with a generator seeded 0;
    - ``labels`` labels are drawn class-balanced from the pool with ``seed``;
    - train: the 50,000 binarized-MNIST training images, unlabelled (UNLABELLED), with the
      labelled examples placed at evenly spaced rows (every prefix holds the same fraction);
      valid: the 10,000 validation images, unlabelled; test: the test half, with its labels.

    The t10k images are the sources of binarized MNIST's test split: a model trained here is
    never used for the density tables.
    """
    density = _load_binarized_mnist(data_dir)
    digits = _load_mnist(data_dir)
    _require("test" in digits.splits, f"mnist-semi needs the MNIST t10k images and labels (t10k-*-ubyte[.gz]) in {data_dir / 'mnist'}")
    t10k = digits.split("test")
    assert t10k.y is not None
    order = torch.randperm(len(t10k), generator=torch.Generator().manual_seed(0))
    binary = torch.bernoulli(t10k.x.float() / 255.0, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    pool, test = order[:5000], order[5000:]
    chosen = semi_supervised(Dataset("t10k", {"train": Split(binary[pool], t10k.y[pool])}, (784,), "binary"), labels, seed).split("train")
    assert chosen.y is not None
    kept = chosen.y >= 0
    unlabelled = density.split("train").x
    n = len(unlabelled) + int(kept.sum())
    at = torch.linspace(0, n - 1, int(kept.sum())).round().long()  # where the labelled rows go
    slots = torch.ones(n, dtype=torch.bool)
    slots[at] = False
    x = torch.empty((n, 784), dtype=torch.uint8)
    y = torch.full((n,), UNLABELLED, dtype=torch.int64)
    x[slots], x[at], y[at] = unlabelled, chosen.x[kept], chosen.y[kept]
    valid = density.split("valid").x
    splits = {"train": Split(x, y), "valid": Split(valid, torch.full((len(valid),), UNLABELLED, dtype=torch.int64)),
              "test": Split(binary[test], t10k.y[test])}
    return Dataset(f"mnist-semi ({labels} labels)", splits, (784,), "binary", (28, 28))


# JSB chorales

_JSB_URL = "https://raw.githubusercontent.com/czhuang/JSB-Chorales-dataset/master/"
_JSB_FILES = ("jsb-chorales-quarter.json", "JSB Chorales.pickle", "jsb_chorales.pickle")


def _parse_jsb(path: Path, where: str | None = None) -> dict[str, Split]:
    """Parses the JSON (or a local ``.pickle``) chorales into zero-padded 88-key piano rolls per split."""
    where = where or str(path)
    corrupt = functools.partial(_corrupt, "JSB chorales", where)
    data = _read_bytes(path, where)
    try:
        # pickle only for a local file named so: never unpickle what a server sent
        raw = pickle.loads(data, encoding="latin1") if path.suffix == ".pickle" else json.loads(data)
    except Exception as err:  # any decode failure of a damaged file
        raise corrupt(f"cannot decode it ({_first_line(err)})") from None
    if not isinstance(raw, dict) or not any(s in raw for s in SPLITS):
        raise corrupt("expected a mapping with train/valid/test lists of sequences")
    try:
        seqs = {s: list(raw[s]) for s in SPLITS if s in raw}
        t_max = max((len(seq) for v in seqs.values() for seq in v), default=0)
        _require(t_max > 0, f"JSB chorales file {where} holds no time steps")
        splits = {}
        for s, v in seqs.items():
            roll = np.zeros((len(v), t_max, 88), np.float32)
            notes = [(i, t, p) for i, seq in enumerate(v) for t, step in enumerate(seq) for p in step]
            if notes:
                i, t, p = np.array(notes, dtype=np.float64).T
                bad = ~((p == np.round(p)) & (p >= 21) & (p <= 108))
                if bad.any():
                    raise PyrovaeError(f"JSB chorales file {where} holds pitch {p[bad][0]:g} in {s!r}, "
                                       "outside the 88 piano keys 21..108; fix or replace the file")
                roll[i.astype(np.int64), t.astype(np.int64), p.astype(np.int64) - 21] = 1.0
            lengths = torch.tensor([len(seq) for seq in v], dtype=torch.int64)
            splits[s] = Split(torch.from_numpy(roll), lengths=lengths)
    except (TypeError, ValueError) as err:
        raise corrupt(f"unexpected structure ({_first_line(err)})") from None
    return splits


@DATASETS.register("jsb-chorales", "Bach chorales (JSB) as 88-key piano rolls, 229/76/77 sequences")
def _load_jsb_chorales(data_dir: Path, base_url: str | None = None, sequences: int | None = None) -> Dataset:
    """Reads ``jsb-chorales-quarter.json`` (or the pickle) from the data directory, downloading if
    needed; ``sequences=N`` keeps the first N of each split (a quick subset), padded to the
    longest kept."""
    sub = data_dir / "jsb_chorales"
    found = next((d / n for d in (sub, data_dir) for n in _JSB_FILES if (d / n).is_file()), None)
    if found is not None:
        splits = _parse_jsb(found)
    else:
        url, _ = _base_url(base_url, "PYROVAE_JSB_URL", _JSB_URL)
        name = _JSB_FILES[0]
        with _target_dir(sub, name):
            try:
                splits, _ = _download([(url + name, sub / name)], _parse_jsb)
            except _FetchError as err:
                raise PyrovaeError(f"could not download JSB chorales from {url} ({err}); place {name} "
                                   f"in {sub}, or set base_url / PYROVAE_JSB_URL") from None
    if sequences is not None:
        _require(isinstance(sequences, int) and sequences >= 1, f"sequences must be a positive integer, got {sequences!r}")
        kept = {name: (part.x[:sequences], part.lengths[:sequences]) for name, part in splits.items() if part.lengths is not None}
        longest = max(int(lengths.max()) for _, lengths in kept.values())
        splits = {name: Split(x[:, :longest].contiguous(), lengths=lengths) for name, (x, lengths) in kept.items()}
    t_max = next(iter(splits.values())).x.shape[1]
    return Dataset("jsb-chorales", splits, (t_max, 88), "sequence")


# A user's own file

def _load_custom(path: Path, seed: int = 0) -> Dataset:
    """A user's ``(N, D)`` or ``(N, H, W)`` array file with a fixed seeded 80/10/10 split."""
    _require(path.is_file(), f"data file {path} not found; pass a data set name "
                             f"({', '.join(DATASETS)}) or an existing .npy/.npz/.pt file")
    try:
        if path.suffix.lower() in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = np.load(path, allow_pickle=False)
            if isinstance(obj, np.lib.npyio.NpzFile):
                with obj:
                    obj = {k: obj[k] for k in obj.files}
    except Exception as err:  # numpy/torch raise many types for damaged files
        raise PyrovaeError(f"cannot read data file {path} ({_first_line(err)}); "
                           "save an (N, D) or (N, H, W) array with numpy.save or torch.save") from None
    if isinstance(obj, dict):
        keys = list(obj)
        _require(len(keys) == 1 or "x" in obj, f"data file {path} holds arrays {keys}; "
                                               "keep one array, or name the data 'x'")
        obj = obj["x"] if "x" in obj else obj[keys[0]]
    arr = obj.numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    _require(np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating),
             f"data file {path} holds {arr.dtype} values; expected numbers")
    _require(arr.ndim in (2, 3) and arr.shape[0] > 0 and arr[0].size > 0,
             f"data file {path} holds an array of shape {tuple(arr.shape)}; expected (N, D) or (N, H, W)")
    _require(bool(np.isfinite(arr).all()), f"data file {path} holds NaN or infinite values; remove them")
    flat = arr.reshape(arr.shape[0], -1)
    if ((flat == 0) | (flat == 1)).all():
        x, kind = flat.astype(np.uint8), "binary"
    elif flat.min() >= 0 and flat.max() <= 1:
        x, kind = flat.astype(np.float32), "grayscale"
    elif flat.min() >= 0 and flat.max() <= 255 and (flat == np.round(flat)).all():
        x, kind = flat.astype(np.uint8), "grayscale"
    else:
        raise PyrovaeError(f"data file {path} holds values in [{flat.min():g}, {flat.max():g}]; expected "
                           "0/1, values in [0, 1] or integers 0..255")
    n = len(x)
    parts = _fixed_split(n, (n - 2 * (n // 10), n // 10, n // 10), seed)
    splits = {k: Split(_tensor(x[i])) for k, i in parts.items()}
    image_shape = (int(arr.shape[1]), int(arr.shape[2])) if arr.ndim == 3 else None
    return Dataset(str(path), splits, (x.shape[1],), kind, image_shape)
