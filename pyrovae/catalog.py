"""What `pyrovae list` and `--help` show: each registry's names and descriptions, kept in
catalog.json beside this file so that showing them loads neither torch nor Pyro.

``python -m pyrovae.write_catalog`` rewrites the file from the registries; a test checks that
it matches them, so a model registered without refreshing it fails the suite.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "PATH", "names", "read"]

KINDS = ("models", "guides", "objectives", "methods", "datasets", "priors", "decoders", "likelihoods")
PATH = Path(__file__).with_name("catalog.json")


@functools.cache
def read() -> dict[str, list[dict[str, Any]]]:
    """The catalog: kind -> entries, each a name, a description and (guides) the latent shapes served."""
    return json.loads(PATH.read_text())


def names(kind: str) -> str:
    """The registered names of one kind, comma-separated, for help texts."""
    return ", ".join(entry["name"] for entry in read()[kind])
