"""What `pyrovae list` and `--help` show: each registry's names and descriptions, kept in
catalog.json beside this file so that showing them loads neither torch nor Pyro.

``python -m pyrovae.catalog`` rewrites the file from the registries; a test checks that it
matches them, so a model registered without refreshing it fails the suite.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "PATH", "from_registries", "names", "read"]

KINDS = ("models", "guides", "objectives", "methods", "datasets", "priors", "decoders", "likelihoods")
PATH = Path(__file__).with_name("catalog.json")


@functools.cache
def read() -> dict[str, list[dict[str, Any]]]:
    """The catalog: kind -> entries, each a name, a description and (guides) the latent shapes served."""
    return json.loads(PATH.read_text())


def names(kind: str) -> str:
    """The registered names of one kind, comma-separated, for help texts."""
    return ", ".join(entry["name"] for entry in read()[kind])


def from_registries() -> dict[str, list[dict[str, Any]]]:
    """The catalog as the live registries hold it (imports everything that registers)."""
    import pyrovae  # here, not above: reading the catalog must not load torch
    from pyrovae import registry

    pyrovae.MODELS  # noqa: B018  (the first access imports every module that registers)
    registries = {kind: getattr(registry, kind.upper()) for kind in KINDS}
    return {
        kind: [
            {"name": e.name, "description": e.description, **({"latent_shapes": e.target.latent_shapes} if kind == "guides" else {})}
            for e in registries[kind].entries()
        ]
        for kind in KINDS
    }


if __name__ == "__main__":
    PATH.write_text(json.dumps(from_registries(), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {PATH}")
