"""Rewrites catalog.json (`pyrovae.catalog`) from the live registries: ``python -m pyrovae.write_catalog``.

A test checks that the file matches `from_registries`, so a model registered without refreshing
it fails the suite. This module loads torch and Pyro; `pyrovae.catalog` reads the file without.
"""

from __future__ import annotations

import json
from typing import Any

from pyrovae import MODELS, registry  # noqa: F401  (importing a registry imports every module that registers)
from pyrovae.catalog import KINDS, PATH

__all__ = ["from_registries", "write"]


def from_registries() -> dict[str, list[dict[str, Any]]]:
    """The catalog as the live registries hold it."""
    registries = {kind: getattr(registry, kind.upper()) for kind in KINDS}
    return {
        kind: [
            {"name": e.name, "description": e.description, **({"latent_shapes": e.target.latent_shapes} if kind == "guides" else {})}
            for e in registries[kind].entries()
        ]
        for kind in KINDS
    }


def write() -> None:
    """Writes catalog.json from the registries."""
    PATH.write_text(json.dumps(from_registries(), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write()
    print(f"wrote {PATH}")
