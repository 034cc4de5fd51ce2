"""The wheel holds every file of models/ and guides/ (installed as pyrovae.models / pyrovae.guides)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (path,) = out.glob("pyrovae-*.whl")
    return set(zipfile.ZipFile(path).namelist())


@pytest.mark.parametrize("folder", ["models", "guides"])
def test_wheel_holds_every_file(wheel, folder):
    files = sorted(p.name for p in (ROOT / folder).glob("*.py"))
    assert files, folder
    for name in files:
        assert f"pyrovae/{folder}/{name}" in wheel, name
    assert not any(n.startswith(f"{folder}/") for n in wheel)


def test_wheel_has_the_console_script(wheel):
    entry = next(n for n in wheel if n.endswith("entry_points.txt"))
    assert entry


@pytest.mark.parametrize("folder", ["models", "guides"])
def test_top_level_import_fails_loudly(folder):
    done = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and f"import pyrovae.{folder}" in done.stderr
