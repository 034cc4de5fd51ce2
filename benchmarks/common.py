"""What every benchmark shares: the machine's name, fit-and-score, and writing results."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from readme import update_readme

from pyrovae.evaluate import evaluate
from pyrovae.experiment import Config, fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = str(ROOT.parent / "shared" / "data")


def machine(device: torch.device | str = "cpu") -> str:
    """The processor (and the GPU, for a CUDA device), thread count and torch version."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    gpu = f"{torch.cuda.get_device_name(device)}, " if torch.device(device).type == "cuda" else ""
    return f"{gpu}{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def fit_and_score(config: Config, valid: torch.Tensor, samples: int) -> dict[str, Any]:
    """Train `config` (no run directory) and score the validation images: nats per example."""
    experiment, metrics = fit(config, progress=False)
    experiment.model.eval(), experiment.guide.eval()
    start = time.perf_counter()
    result = evaluate(experiment.model, experiment.guide, list(valid.split(500)), num_samples=samples)
    return {
        "epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"], "examples_per_second": metrics["examples_per_second"],
        "elbo": result.elbo.mean().item(), "log_likelihood": result.log_likelihood.mean().item(),
        "gap": (result.log_likelihood - result.elbo).mean().item(), "eval_seconds": time.perf_counter() - start,
        "peak_memory_mb": metrics["peak_memory_mb"],
    }


def merge_rows(name: str, rows: list[dict[str, Any]], key: str, order: list[str]) -> list[dict[str, Any]]:
    """`rows`, plus the previous results' rows whose `key` was not run now, in `order`."""
    path = RESULTS / f"{name}.json"
    fresh = {r[key] for r in rows}
    old = [r for r in json.loads(path.read_text())["rows"] if r[key] not in fresh] if path.exists() else []
    return sorted(old + rows, key=lambda r: order.index(r[key]) if r[key] in order else len(order))


def write_results(name: str, result: dict[str, Any], table: str) -> None:
    """benchmarks/results/NAME.json and .md, and the README section NAME."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    update_readme(name, table)
    print(table)
