"""The wheel holds every file of models/ and guides/ (installed as pyrovae.models / pyrovae.guides) and the catalog."""

import configparser
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (path,) = out.glob("pyrovae-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel(wheel_path):
    return set(zipfile.ZipFile(wheel_path).namelist())


@pytest.mark.parametrize("folder", ["models", "guides"])
def test_wheel_holds_every_file(wheel, folder):
    files = sorted(p.name for p in (ROOT / folder).glob("*.py"))
    assert files, folder
    for name in files:
        assert f"pyrovae/{folder}/{name}" in wheel, name
    assert not any(n.startswith(f"{folder}/") for n in wheel)


def test_wheel_holds_the_catalog_list_reads(wheel):
    assert "pyrovae/catalog.json" in wheel


def test_wheel_has_the_console_script(wheel_path):
    """The wheel's entry_points.txt names exactly ``pyrovae = pyrovae.cli:main`` as a console script,
    and that target is the callable the CLI tests run."""
    with zipfile.ZipFile(wheel_path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(name).decode())
    assert dict(entry_points["console_scripts"]) == {"pyrovae": "pyrovae.cli:main"}
    module, _, attr = entry_points["console_scripts"]["pyrovae"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("folder", ["models", "guides"])
def test_top_level_import_fails_loudly(folder):
    done = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and f"import pyrovae.{folder}" in done.stderr
