"""Tests of pyrovae.data on the real data copies in ../shared/data (never the internet)."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovae.data
from pyrovae.data import Dataset, cache_dir, data_dir, load_dataset, minibatches
from pyrovae.errors import PyrovaeError

SHARED = Path(
    os.environ.get("PYROVAE_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)
DEAD_URL = "http://127.0.0.1:9/"  # refused at once: a test that tries to download fails, offline


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data file {path} not found (set PYROVAE_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No download reaches the internet; data and cache directories are fresh and apart."""
    for var in ("PYROVAE_BINARIZED_MNIST_URL", "PYROVAE_MNIST_URL", "PYROVAE_JSB_URL"):
        monkeypatch.setenv(var, DEAD_URL)
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "default-data"))
    monkeypatch.setenv("PYROVAE_CACHE", str(tmp_path_factory.mktemp("cache")))


@contextmanager
def serve(directory: Path | None, requests: list[str] | None = None) -> Iterator[str]:
    """Serves ``directory`` on 127.0.0.1 (``None``: 404 for everything); yields the base URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if requests is not None:
                requests.append(self.path)
            if directory is None:
                self.send_error(404)
            else:
                super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Handler, directory=str(directory or "."))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".") or p.suffix == ".part"]


def sorted_rows(x: np.ndarray) -> list[tuple]:
    return sorted(map(tuple, x.tolist()))


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` (itself included) with its mode, size and modification time."""
    return {str(p): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def cache_entries(stem: str = "") -> list[Path]:
    return sorted((cache_dir() / "binarized-mnist").glob(f"{stem}*.npy"))


def count_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the file name of every ``.amat`` parse from now on."""
    calls: list[str] = []
    real = pyrovae.data._parse_amat

    def parse(rows: int, path: Path, *args: object) -> np.ndarray:
        calls.append(path.name)
        return real(rows, path, *args)

    monkeypatch.setattr(pyrovae.data, "_parse_amat", parse)
    return calls


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_a_fixed_partition_with_sklearn_labels() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.kind == "binary" and ds.event_shape == (64,) and ds.image_shape == (8, 8)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 1197, "valid": 300, "test": 300}
    assert all(s.x.dtype == torch.uint8 and s.y.dtype == torch.int64 for s in ds.splits.values())
    bunch = load_digits()
    expected = np.concatenate([(bunch.data >= 8).astype(np.int64), bunch.target[:, None]], 1)
    got = np.concatenate([np.concatenate([s.x.numpy(), s.y.numpy()[:, None]], 1) for s in ds.splits.values()])
    assert sorted_rows(got) == sorted_rows(expected)  # disjoint and covering, labels with their images
    again, other = load_dataset("digits"), load_dataset("digits", seed=1)
    assert all(torch.equal(ds.split(k).x, again.split(k).x) for k in ds.splits)
    assert not torch.equal(ds.split("train").y, other.split("train").y)
    batch = ds.batch("train", torch.arange(10))
    assert (
        batch.dtype == torch.float32
        and batch.shape == (10, 64)
        and set(batch.unique().tolist()) <= {0.0, 1.0}
    )
    assert ds.mask("train", torch.arange(10)) is None


def test_digits_grayscale_scales_to_unit_interval() -> None:
    ds = load_dataset("digits", binarize=False)
    assert ds.kind == "grayscale" and ds.split("train").x.dtype == torch.uint8
    assert int(ds.split("train").x.max()) == 255
    binary = load_dataset("digits")
    x = ds.batch("valid", torch.arange(300))
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal((x * 16 >= 8 - 1e-4).to(torch.uint8), binary.split("valid").x)  # same rows, same order


def test_missing_split_and_unknown_names_and_options() -> None:
    with pytest.raises(PyrovaeError, match="digits"):
        load_dataset("digit")
    with pytest.raises(PyrovaeError, match="binarized-mnist"):
        load_dataset("binarized_mnist")
    with pytest.raises(PyrovaeError, match="binarize, seed"):
        load_dataset("digits", binarise=False)
    with pytest.raises(PyrovaeError, match="true or false"):
        load_dataset("digits", binarize="yes")
    jsb = Dataset("x", {}, (1,), "binary")
    with pytest.raises(PyrovaeError, match="no 'test' split; choose from: none"):
        jsb.split("test")


# ----------------------------------------------------------------------------- binarized MNIST


@pytest.fixture(scope="module")
def bmnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache directory the ``bmnist`` fixture's first load filled."""
    return tmp_path_factory.mktemp("bmnist-cache")


@pytest.fixture(scope="module")
def bmnist(tmp_path_factory: pytest.TempPathFactory, bmnist_cache: Path) -> tuple[Path, Dataset]:
    """binarized-MNIST parsed from symlinks to the shared .gz files (first load: parse + cache)."""
    root = tmp_path_factory.mktemp("bmnist")
    for split in ("train", "valid"):
        (root / f"binarized_mnist_{split}.amat.gz").symlink_to(
            shared("binarized_mnist", f"binarized_mnist_{split}.amat.gz").resolve()
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYROVAE_CACHE", str(bmnist_cache))
        return root, load_dataset("binarized-mnist", root, base_url=DEAD_URL)


def test_binarized_mnist_reads_the_canonical_files(bmnist: tuple[Path, Dataset]) -> None:
    root, ds = bmnist
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 50000, "valid": 10000}
    assert ds.kind == "binary" and ds.event_shape == (784,) and ds.image_shape == (28, 28)
    for split in ds.splits.values():
        assert split.x.dtype == torch.uint8 and split.x.shape[1] == 784 and split.y is None
        assert set(split.x.unique().tolist()) == {0, 1}
    for name in ("train", "valid"):
        with gzip.open(root / f"binarized_mnist_{name}.amat.gz", "rt") as f:
            first = [int(v) for v in f.readline().split()]
        assert ds.split(name).x[0].tolist() == first
    assert 0.05 < float(ds.split("train").x.float().mean()) < 0.25  # MNIST ink, not all zeros
    batch = ds.batch("valid", torch.tensor([0, 9999]))
    assert batch.dtype == torch.float32 and torch.equal(batch, ds.split("valid").x[[0, 9999]].float())


def test_binarized_mnist_cache_is_fast_and_exact(
    bmnist: tuple[Path, Dataset], bmnist_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load cached both splits in the cache directory, none in the data directory;
    the second reads them back without parsing."""
    root, ds = bmnist
    monkeypatch.setenv("PYROVAE_CACHE", str(bmnist_cache))
    assert sorted(p.name for p in root.iterdir()) == ["binarized_mnist_train.amat.gz", "binarized_mnist_valid.amat.gz"]
    assert [p.name.split("-")[0] for p in cache_entries()] == ["binarized_mnist_train", "binarized_mnist_valid"]
    monkeypatch.setattr(pyrovae.data, "_parse_amat", lambda *args, **kwargs: pytest.fail("cache not used"))
    start = time.perf_counter()
    again = load_dataset("binarized-mnist", root, base_url=DEAD_URL)
    assert time.perf_counter() - start < 1.0
    assert all(torch.equal(ds.split(k).x, again.split(k).x) for k in ("train", "valid"))


def test_binarized_mnist_cache_follows_its_source(
    bmnist: tuple[Path, Dataset], bmnist_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two data directories never share an entry; a changed source, or a damaged entry, is
    parsed again, and the entry of the old version is removed."""
    root, ds = bmnist
    monkeypatch.setenv("PYROVAE_CACHE", str(bmnist_cache))  # the train split is cached there already
    text = gzip.decompress((root / "binarized_mnist_valid.amat.gz").read_bytes())
    reversed_text = b"".join(text.splitlines(keepends=True)[::-1])
    valid, flipped = ds.split("valid").x, ds.split("valid").x.flip(0)
    dirs = {"a": (tmp_path / "a", text), "b": (tmp_path / "b", reversed_text)}
    for directory, content in dirs.values():
        directory.mkdir()
        (directory / "binarized_mnist_train.amat.gz").symlink_to((root / "binarized_mnist_train.amat.gz").resolve())
        (directory / "binarized_mnist_valid.amat").write_bytes(content)
    parses = count_parses(monkeypatch)

    def load(name: str) -> torch.Tensor:
        return load_dataset("binarized-mnist", dirs[name][0], base_url=DEAD_URL).split("valid").x

    assert torch.equal(load("a"), valid) and torch.equal(load("b"), flipped)  # same name, own entries
    assert parses == ["binarized_mnist_valid.amat"] * 2  # train came from the cache: same source file
    assert torch.equal(load("a"), valid) and torch.equal(load("b"), flipped) and len(parses) == 2
    entries = cache_entries("binarized_mnist_valid")
    assert len(entries) == 3  # the fixture's source, a's and b's

    (dirs["a"][0] / "binarized_mnist_valid.amat").write_bytes(reversed_text)  # edited in place: same size
    assert torch.equal(load("a"), flipped) and len(parses) == 3
    assert len(cache_entries("binarized_mnist_valid")) == 3  # a's old entry replaced, not kept beside
    (entry,) = set(cache_entries("binarized_mnist_valid")) - set(entries)

    for damage in (lambda: entry.write_bytes(b"\x93NUMPY garbage"), lambda: np.save(entry, np.zeros((5, 98), np.uint8))):
        damage()
        assert torch.equal(load("a"), flipped) and np.array_equal(np.unpackbits(np.load(entry), axis=1), flipped.numpy())
    assert len(parses) == 5 and torch.equal(load("b"), flipped) and len(parses) == 5


def test_binarized_mnist_read_only_data_dir_is_never_written(
    bmnist: tuple[Path, Dataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only data directory holding the files loads, through the cache, and is left as it was.

    Tests may run as root, whom the mode bits do not stop: every file creation and rename is
    watched as well, and none may target the data directory."""
    root, ds = bmnist
    data = tmp_path / "ro"
    (data / "binarized_mnist").mkdir(parents=True)
    for split in ("train", "valid"):
        shutil.copy(root / f"binarized_mnist_{split}.amat.gz", data / "binarized_mnist")
        (data / "binarized_mnist" / f"binarized_mnist_{split}.amat.gz").chmod(0o444)
    for directory in (data / "binarized_mnist", data):
        directory.chmod(0o555)
    before = snapshot(data)
    targets: list[str] = []
    mkstemp, replace, mkdir = tempfile.mkstemp, os.replace, Path.mkdir
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: (targets.append(str(k.get("dir"))), mkstemp(*a, **k))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (targets.append(str(dst)), replace(src, dst))[1])
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (targets.append(str(self)), mkdir(self, *a, **k))[1])
    parses = count_parses(monkeypatch)
    try:
        for _ in range(2):
            got = load_dataset("binarized-mnist", data, base_url=DEAD_URL)
            assert all(torch.equal(ds.split(k).x, got.split(k).x) for k in ("train", "valid"))
    finally:
        for directory in (data, data / "binarized_mnist"):
            directory.chmod(0o755)
    assert snapshot(data) == before | {str(p): (0o40755, *before[str(p)][1:]) for p in (data, data / "binarized_mnist")}
    assert targets and not [t for t in targets if Path(t).is_relative_to(data)]
    assert all(Path(t).is_relative_to(cache_dir()) for t in targets)
    assert len(parses) == 2 and len(cache_entries()) == 2  # parsed once, then read from the cache


@pytest.mark.parametrize(
    "name, lacks", [("binarized-mnist", "binarized_mnist_train.amat[.gz]"), ("mnist", "t10k-*"), ("jsb-chorales", "jsb-chorales-quarter.json")]
)
def test_read_only_data_dir_without_the_files_is_refused_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, lacks: str
) -> None:
    """One line naming the directory and the files it lacks; nothing fetched, nothing written."""
    data = tmp_path / "ro"
    data.mkdir()
    data.chmod(0o555)
    access = os.access  # root passes any mode bits: report the directory read-only as a user sees it
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == data and mode & os.W_OK else access(p, mode, **k))
    requests: list[str] = []
    with serve(shared("binarized_mnist"), requests) as url, pytest.raises(PyrovaeError) as err:
        load_dataset(name, data, base_url=url)
    message = str(err.value)
    assert "read-only" in message and str(data) in message and lacks in message and "\n" not in message
    assert requests == [] and list(data.iterdir()) == []


def test_binarized_mnist_unwritable_cache_only_costs_speed(bmnist: tuple[Path, Dataset], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache that cannot be created warns once per split, and the data are still right."""
    root, ds = bmnist
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("PYROVAE_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.warns(UserWarning, match="could not write cache .*PYROVAE_CACHE"):
        got = load_dataset("binarized-mnist", root, base_url=DEAD_URL)
    assert all(torch.equal(ds.split(k).x, got.split(k).x) for k in ("train", "valid"))
    assert sorted(p.name for p in root.iterdir()) == ["binarized_mnist_train.amat.gz", "binarized_mnist_valid.amat.gz"]


def test_binarized_mnist_accepts_plain_amat_in_subfolder(
    bmnist: tuple[Path, Dataset], tmp_path: Path
) -> None:
    root, ds = bmnist
    sub = tmp_path / "binarized_mnist"
    sub.mkdir()
    with (
        gzip.open(root / "binarized_mnist_valid.amat.gz", "rb") as src,
        open(sub / "binarized_mnist_valid.amat", "wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    (tmp_path / "binarized_mnist_train.amat.gz").symlink_to((root / "binarized_mnist_train.amat.gz").resolve())
    again = load_dataset("binarized-mnist", tmp_path, base_url=DEAD_URL)  # train from the top folder
    assert all(torch.equal(ds.split(k).x, again.split(k).x) for k in ("train", "valid"))
    assert [p.name for p in sub.iterdir()] == ["binarized_mnist_valid.amat"]


def test_binarized_mnist_download_is_atomic_and_test_split_optional(
    bmnist: tuple[Path, Dataset], tmp_path: Path
) -> None:
    _, ds = bmnist
    requests: list[str] = []
    with serve(shared("binarized_mnist"), requests) as url:
        got = load_dataset("binarized-mnist", tmp_path, base_url=url)
    sub = tmp_path / "binarized_mnist"
    assert sorted(p.name for p in sub.iterdir()) == ["binarized_mnist_train.amat.gz", "binarized_mnist_valid.amat.gz"]
    assert [p.name.split("-")[0] for p in cache_entries()] == ["binarized_mnist_train", "binarized_mnist_valid"]
    assert leftovers(tmp_path) == [] and leftovers(cache_dir()) == []
    assert list(got.splits) == ["train", "valid"]  # 404 for test: no test split
    assert "/binarized_mnist_test.amat" in requests and "/binarized_mnist_test.amat.gz" in requests
    assert requests.index("/binarized_mnist_train.amat") < requests.index("/binarized_mnist_train.amat.gz")
    assert all(torch.equal(ds.split(k).x, got.split(k).x) for k in ("train", "valid"))


def test_binarized_mnist_failed_download_leaves_nothing(tmp_path: Path) -> None:
    with serve(None) as url, pytest.raises(PyrovaeError) as err:
        load_dataset("binarized-mnist", tmp_path, base_url=url)
    message = str(err.value)
    assert url in message and "place" in message and "404" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_binarized_mnist_interrupted_download_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(rows: int, path: Path, *args: object) -> None:
        assert path.stat().st_size > 0 and path.name.endswith(".part")  # parsed before it is moved
        raise KeyboardInterrupt

    monkeypatch.setattr(pyrovae.data, "_parse_amat", interrupt)
    with serve(shared("binarized_mnist")) as url, pytest.raises(KeyboardInterrupt):
        load_dataset("binarized-mnist", tmp_path, base_url=url)
    assert list(tmp_path.iterdir()) == []


def _amat_lines(n: int, value: str = "0") -> list[str]:
    return [" ".join([value] * 784) for _ in range(n)]


@pytest.mark.parametrize(
    "lines, problem",
    [
        (_amat_lines(3)[:2] + [" ".join(["0"] * 783)], "line 3 has 783 values, expected 784"),
        (_amat_lines(2) + [" ".join(["1"] * 400 + ["2"] + ["0"] * 383)], "line 3 holds '2'"),
        (_amat_lines(2) + [" ".join(["1"] * 400)[:-3]], "line 3 has"),  # truncated last row
        (_amat_lines(2) + ["0 " * 783 + "0.5"], "other than 0/1"),
        (_amat_lines(12, "1"), "12 rows, expected 50000"),
    ],
)
def test_binarized_mnist_corrupt_file_is_rejected(tmp_path: Path, lines: list[str], problem: str) -> None:
    (tmp_path / "binarized_mnist_train.amat").write_text("\n".join(lines) + "\n")
    (tmp_path / "binarized_mnist_valid.amat").write_text("\n".join(_amat_lines(2)) + "\n")
    with pytest.raises(PyrovaeError, match="corrupt") as err:
        load_dataset("binarized-mnist", tmp_path, base_url=DEAD_URL)
    assert "binarized_mnist_train.amat" in str(err.value) and problem in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binarized_mnist_train.amat", "binarized_mnist_valid.amat"]
    assert cache_entries("binarized_mnist_train") == []


def test_binarized_mnist_truncated_gzip_is_rejected(tmp_path: Path) -> None:
    data = shared("binarized_mnist", "binarized_mnist_valid.amat.gz").read_bytes()
    (tmp_path / "binarized_mnist_train.amat.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "binarized_mnist_valid.amat.gz").write_bytes(data)
    with pytest.raises(PyrovaeError, match="binarized_mnist_train.amat.gz"):
        load_dataset("binarized-mnist", tmp_path, base_url=DEAD_URL)


# ----------------------------------------------------------------------------- MNIST


def _idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


@pytest.fixture(scope="module")
def t10k() -> tuple[np.ndarray, np.ndarray]:
    images = _idx(shared("mnist", "t10k-images-idx3-ubyte.gz"), 16).reshape(10000, 784).copy()
    labels = _idx(shared("mnist", "t10k-labels-idx1-ubyte.gz"), 8).astype(np.int64)
    return images, labels


def test_mnist_reads_idx_files_directly(tmp_path: Path, t10k: tuple[np.ndarray, np.ndarray]) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(shared("mnist", name).resolve())
    ds = load_dataset("mnist", tmp_path)
    assert list(ds.splits) == ["test"] and ds.kind == "grayscale" and not ds.dynamic_binarization
    test = ds.split("test")
    assert test.x.dtype == torch.uint8 and test.x.shape == (10000, 784) and ds.image_shape == (28, 28)
    assert np.array_equal(test.x.numpy(), t10k[0]) and np.array_equal(test.y.numpy(), t10k[1])
    batch = ds.batch("test", torch.arange(5))
    assert torch.allclose(batch, torch.from_numpy(t10k[0][:5]).float() / 255) and batch.max() <= 1.0


def test_mnist_train_file_gives_train_and_last_10000_as_valid(
    tmp_path: Path, t10k: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = t10k
    blocks = [np.roll(images, k, axis=0) for k in range(6)]
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (60000, 28, 28))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + np.concatenate(blocks).tobytes())
    label_header = (0x801).to_bytes(4, "big") + (60000).to_bytes(4, "big")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        label_header + np.tile(labels, 6).astype(np.uint8).tobytes()
    )
    ds = load_dataset("mnist", tmp_path)  # plain IDX files directly in the data directory
    assert list(ds.splits) == ["train", "valid"]
    assert len(ds.split("train")) == 50000 and np.array_equal(ds.split("valid").x.numpy(), blocks[5])
    assert np.array_equal(ds.split("train").x[10000:20000].numpy(), blocks[1])
    assert np.array_equal(ds.split("valid").y.numpy(), labels)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda b: b"\x00\x00\x08\x02" + b[4:], "magic"),
        (lambda b: b[:-100], "data bytes"),
        (lambda b: b[:8] + (7).to_bytes(4, "big") + b[12:], "shape"),
    ],
)
def test_mnist_corrupt_idx_is_rejected(tmp_path: Path, edit, problem: str) -> None:
    images = gzip.decompress(shared("mnist", "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(edit(images))
    shutil.copy(shared("mnist", "t10k-labels-idx1-ubyte.gz"), tmp_path)
    with pytest.raises(PyrovaeError, match="corrupt") as err:
        load_dataset("mnist", tmp_path)
    assert "t10k-images-idx3-ubyte" in str(err.value) and problem in str(err.value)


def test_mnist_images_without_labels_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte.gz").symlink_to(
        shared("mnist", "t10k-images-idx3-ubyte.gz").resolve()
    )
    with pytest.raises(PyrovaeError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_mnist_download_gives_the_splits_the_server_has(
    tmp_path: Path, t10k: tuple[np.ndarray, np.ndarray]
) -> None:
    with serve(shared("mnist")) as url, pytest.warns(UserWarning, match="train"):
        ds = load_dataset("mnist", tmp_path, base_url=url)
    assert list(ds.splits) == ["test"] and np.array_equal(ds.split("test").y.numpy(), t10k[1])
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    assert leftovers(tmp_path) == []
    with serve(None) as url, pytest.raises(PyrovaeError, match="no MNIST IDX files"):
        load_dataset("mnist", tmp_path / "empty", base_url=url)
    assert not (tmp_path / "empty").exists()


def test_mnist_dynamic_binarization(tmp_path: Path, t10k: tuple[np.ndarray, np.ndarray]) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(shared("mnist", name).resolve())
    ds = load_dataset("mnist", tmp_path, binarize="dynamic")
    assert ds.dynamic_binarization and ds.kind == "binary" and ds.split("test").x.dtype == torch.uint8
    index = torch.arange(2000)
    a = ds.batch("test", index, torch.Generator().manual_seed(0))
    b = ds.batch("test", index, torch.Generator().manual_seed(1))
    c = ds.batch("test", index, torch.Generator().manual_seed(0))
    assert set(a.unique().tolist()) == {0.0, 1.0} and torch.equal(a, c) and not torch.equal(a, b)
    p = torch.from_numpy(t10k[0][:2000]).float() / 255
    assert abs(float(a.mean() - p.mean())) < 0.005 and bool((a[p == 0] == 0).all() and (a[p == 1] == 1).all())
    with pytest.raises(PyrovaeError, match="dynamic"):
        load_dataset("mnist", tmp_path, binarize="static")


# ----------------------------------------------------------------------------- JSB chorales


def _expected_rolls(raw: dict, t_max: int) -> dict[str, torch.Tensor]:
    rolls = {}
    for split, seqs in raw.items():
        roll = torch.zeros(len(seqs), t_max, 88)
        for i, seq in enumerate(seqs):
            for t, step in enumerate(seq):
                for pitch in step:
                    roll[i, t, int(pitch) - 21] = 1.0
        rolls[split] = roll
    return rolls


def test_jsb_chorales_piano_rolls_match_the_json(tmp_path: Path) -> None:
    source = shared("jsb_chorales", "jsb-chorales-quarter.json")
    raw = json.loads(source.read_text())
    (tmp_path / "jsb_chorales").mkdir()
    (tmp_path / "jsb_chorales" / source.name).symlink_to(source.resolve())
    ds = load_dataset("jsb-chorales", tmp_path)
    t_max = max(len(seq) for seqs in raw.values() for seq in seqs)
    assert ds.kind == "sequence" and ds.event_shape == (t_max, 88) and ds.image_shape is None
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 229, "valid": 76}
    expected = _expected_rolls(raw, t_max)
    for name, split in ds.splits.items():
        assert split.x.dtype == torch.float32 and split.x.shape == (len(raw[name]), t_max, 88)
        assert split.lengths.tolist() == [len(seq) for seq in raw[name]]
        assert torch.equal(split.x, expected[name])  # ones at the pitches, zeros elsewhere and past the end
        index = torch.arange(len(split))
        mask = ds.mask(name, index)
        assert mask.dtype == torch.bool and mask.shape == (len(split), t_max)
        assert mask.sum(1).tolist() == split.lengths.tolist() and not split.x[~mask].any()
        assert torch.equal(ds.batch(name, index), split.x)
    # the same data as a pickle with float pitches, directly in the data directory
    floats = {k: [[[float(p) for p in step] for step in seq] for seq in v] for k, v in raw.items()}
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "JSB Chorales.pickle").write_bytes(pickle.dumps(floats))
    again = load_dataset("jsb-chorales", tmp_path / "pickled")
    assert all(torch.equal(again.split(k).x, ds.split(k).x) for k in raw)


def test_jsb_chorales_download_and_bad_pitch(tmp_path: Path) -> None:
    with serve(shared("jsb_chorales")) as url:
        ds = load_dataset("jsb-chorales", tmp_path, base_url=url)
    assert (tmp_path / "jsb_chorales" / "jsb-chorales-quarter.json").is_file() and leftovers(tmp_path) == []
    assert len(ds.split("valid")) == 76
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "jsb-chorales-quarter.json").write_text(json.dumps({"train": [[[60, 64], [120]]]}))
    with pytest.raises(PyrovaeError, match="pitch 120"):
        load_dataset("jsb-chorales", bad)
    (bad / "jsb-chorales-quarter.json").write_text('{"train": [[[60, 64], [6')
    with pytest.raises(PyrovaeError, match="corrupt"):
        load_dataset("jsb-chorales", bad)
    with serve(None) as url, pytest.raises(PyrovaeError, match="could not download JSB"):
        load_dataset("jsb-chorales", tmp_path / "none", base_url=url)
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- a user's own file


def test_custom_file_binary_grayscale_and_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    binary = (rng.random((200, 12)) < 0.3).astype(np.float64)
    np.save(tmp_path / "binary.npy", binary)
    ds = load_dataset(str(tmp_path / "binary.npy"))
    assert ds.kind == "binary" and ds.event_shape == (12,) and ds.image_shape is None
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 160, "valid": 20, "test": 20}
    stored = torch.cat([s.x for s in ds.splits.values()]).numpy()
    assert stored.dtype == np.uint8 and sorted_rows(stored) == sorted_rows(binary.astype(np.uint8))
    assert torch.equal(load_dataset(tmp_path / "binary.npy").split("test").x, ds.split("test").x)  # fixed

    gray = rng.random((50, 6, 5)).astype(np.float32)
    np.savez(tmp_path / "gray.npz", x=gray, y=np.arange(50))
    ds = load_dataset(str(tmp_path / "gray.npz"))
    assert ds.kind == "grayscale" and ds.event_shape == (30,) and ds.image_shape == (6, 5)
    assert ds.split("train").x.dtype == torch.float32
    batch = ds.batch("train", torch.arange(3))
    assert torch.equal(batch, ds.split("train").x[:3])
    assert any(np.allclose(batch[0].numpy(), row) for row in gray.reshape(50, -1))

    torch.save(torch.randint(0, 256, (30, 4, 4), dtype=torch.uint8), tmp_path / "bytes.pt")
    ds = load_dataset(str(tmp_path / "bytes.pt"))
    assert ds.kind == "grayscale" and ds.split("train").x.dtype == torch.uint8
    assert float(ds.batch("train", torch.arange(24)).max()) <= 1.0


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.array([[0.0, np.nan], [1.0, 0.0]]), "NaN"),
        (np.array([[0.0, np.inf], [1.0, 0.0]]), "NaN or infinite"),
        (np.zeros(10), "shape (10,)"),
        (np.zeros((2, 2, 2, 2)), "expected (N, D) or (N, H, W)"),
        (np.full((4, 3), -2.0), "values in [-2, -2]"),
    ],
)
def test_custom_file_bad_arrays_are_rejected(tmp_path: Path, array: np.ndarray, problem: str) -> None:
    np.save(tmp_path / "data.npy", array)
    with pytest.raises(PyrovaeError) as err:
        load_dataset(str(tmp_path / "data.npy"))
    assert problem in str(err.value)


def test_custom_file_unreadable_or_missing(tmp_path: Path) -> None:
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    for name in ("junk.npy", "junk.pt"):
        with pytest.raises(PyrovaeError, match="cannot read data file"):
            load_dataset(str(tmp_path / name))
    with pytest.raises(PyrovaeError, match="not found"):
        load_dataset(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "ok.npy", np.zeros((10, 2)))
    with pytest.raises(PyrovaeError, match="unknown option 'binarize'"):
        load_dataset(str(tmp_path / "ok.npy"), binarize=True)


# ----------------------------------------------------------------------------- helpers


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("PYROVAE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_dir() == tmp_path / ".cache" / "pyrovae"


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$PYROVAE_CACHE, else the platform's user cache directory (XDG on Linux: absolute paths only)."""
    monkeypatch.setenv("PYROVAE_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv("PYROVAE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pyrovae"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")
    assert cache_dir() == tmp_path / ".cache" / "pyrovae"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cache_dir() == tmp_path / "Library" / "Caches" / "pyrovae"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_dir() == tmp_path / "local" / "pyrovae" / "Cache"


def test_minibatches_cover_every_index_once_and_are_reproducible() -> None:
    batches = list(minibatches(103, 10, torch.Generator().manual_seed(3)))
    assert [len(b) for b in batches] == [10] * 10 + [3] and all(b.dtype == torch.int64 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    assert torch.cat(batches).tolist() != list(range(103))
    again = list(minibatches(103, 10, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = torch.cat(list(minibatches(103, 10, torch.Generator().manual_seed(4))))
    assert not torch.equal(other, torch.cat(batches))
    dropped = list(minibatches(103, 10, torch.Generator().manual_seed(3), drop_last=True))
    assert len(dropped) == 10 and len(set(torch.cat(dropped).tolist())) == 100
    ordered = torch.cat(list(minibatches(7, 3, torch.Generator(), shuffle=False)))
    assert ordered.tolist() == list(range(7))
    with pytest.raises(PyrovaeError, match="batch size"):
        next(minibatches(10, 0, torch.Generator()))
