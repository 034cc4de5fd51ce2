"""Models with attention, trained by `pyrovae fit` and scored on the validation split (the test
split is withheld):

- DRAW (Gregor et al. 2015) on static binarized MNIST at the published MNIST architecture (T = 64
  steps, 256 LSTM units, 100-d z per step, 2 x 2 read and 5 x 5 write attention): the ELBO on all
  10,000 validation images and importance-sampled log p(x) with the run's guide on the first
  --examples of them.
- AIR (Eslami et al. 2016) on multi-MNIST (50 x 50 canvases of 0-2 digits composed from the
  binarized-MNIST training digits; the validation canvases from the validation digits), one run
  per --seeds, in the setting of Pyro's AIR example: count accuracy of one guide draw on all
  10,000 validation canvases, with its confusion, and the ELBO.

    python benchmarks/attention.py --models draw --epochs 3
    python benchmarks/attention.py --models air --air-epochs 10 --seeds 0,1,2

A run directory that holds a checkpoint is resumed to its epochs, not started again; only the
sections of the models run are replaced in results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, SHARED_DATA, machine, write_results

from pyrovae.experiment import Config, fit, load

DRAW_ANCHOR = "DRAW 80.97 nats test NLL, without attention 87.40 (Gregor et al. 2015, Table 2); public reproductions report about 82-83"
AIR_ANCHOR = ("count accuracy about 98.7% (Pyro's AIR tutorial, 200,000 steps of batch 64); users in Pyro's issues report 33% and 76% "
              "on their runs")


def draw_config(epochs: int, attention: bool) -> Config:
    sizes = {"steps": 64, "state": 256, "read": 2 if attention else 0, "write": 5 if attention else 0}
    return Config(model="draw", guide="draw", dataset="binarized-mnist", data_dir=SHARED_DATA, latent=100, model_options=sizes,
                  lr=1e-3, method_options={"clip_norm": 10.0}, epochs=epochs, eval_samples=0)


def air_config(epochs: int, seed: int) -> Config:
    """Pyro's AIR example's setting: 3 steps, 28 x 28 windows, z_what 50, 256 LSTM units, ReLU MLPs
    of 200, the truncated geometric count prior at 0.01, scale prior (3, 0.2), decoder sigmoid
    with bias -2, Gaussian pixels of sd 0.3, Adam 1e-4 (the baseline 0.1), batch 64."""
    return Config(model="air", guide="air", objective="elbo-graph", dataset="multi-mnist", data_dir=SHARED_DATA, likelihood="gaussian",
                  activation="relu", latent=50, hidden=(200,), lr=1e-4, batch_size=64, epochs=epochs, eval_samples=0, seed=seed)


def trained(config: Config, where: Path) -> tuple[Any, dict[str, Any]]:
    _, metrics = fit(config, where, resume=(where / "checkpoint.pt").exists(), progress=False)
    return load(where), metrics


def draw_section(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for name, attention in [("DRAW, 2x2 read, 5x5 write", True)] + ([("DRAW without attention", False)] if args.no_attention else []):
        experiment, metrics = trained(draw_config(args.epochs, attention), Path(args.out) / ("draw" if attention else "draw-no-attention"))
        start = time.perf_counter()
        elbo = experiment.evaluate("valid", num_samples=1).elbo.mean().item()
        scored = experiment.evaluate("valid", num_samples=args.samples, examples=args.examples)
        rows.append({"name": name, "elbo": elbo, "elbo_subset": scored.elbo.mean().item(), "log_likelihood": scored.log_likelihood.mean().item(),
                     "epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"],
                     "examples_per_second": metrics.get("examples_per_second"), "eval_seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    setting = (f"Static binarized MNIST, trained on the 50,000 training images (batch 100, Adam 0.001, gradient clipped to norm 10, "
               f"T = 64, 256 LSTM units, z 100 per step), scored on the validation images: the ELBO on all 10,000, IS-{args.samples} "
               f"log p(x) with the run's guide on the first {args.examples}. Machine: {machine()}.")
    return {"setting": setting, "rows": rows}


def air_section(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        experiment, metrics = trained(air_config(args.air_epochs, seed), Path(args.out) / f"air-s{seed}")
        start = time.perf_counter()
        torch.manual_seed(seed)
        truth, inferred = experiment.counts("valid")
        confusion = torch.zeros(int(truth.max()) + 1, experiment.model.steps + 1, dtype=torch.long)
        confusion.index_put_((truth, inferred), torch.ones_like(truth), accumulate=True)
        elbo = experiment.evaluate("valid", num_samples=1).elbo.mean().item()
        rows.append({"seed": seed, "count_accuracy": (truth == inferred).float().mean().item(), "confusion": confusion.tolist(), "elbo": elbo,
                     "epochs": metrics["epochs"], "steps": metrics["epochs"] * -(-len(experiment.data.split("train")) // 64),
                     "train_seconds": metrics["train_seconds"], "examples_per_second": metrics.get("examples_per_second"),
                     "eval_seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    setting = ("Multi-MNIST: 50 x 50 canvases of 0-2 binarized-MNIST digits (uniform counts, 28 x 28 windows at uniform offsets, "
               "OR-ed), 50,000 composed from the training digits, 10,000 from the validation digits (composition seed 0). "
               f"{air_config.__doc__.split(': ', 1)[1].replace(chr(10), ' ').replace('    ', '')} Trained with elbo-graph (Pyro's "
               "TraceGraph_ELBO, the guide's NVIL baseline for z_pres); count accuracy of one guide draw on all 10,000 validation "
               f"canvases. Machine: {machine()}.")
    return {"setting": setting, "rows": rows}


def draw_table(section: dict[str, Any]) -> list[str]:
    lines = ["DRAW. " + section["setting"], "",
             "| model | -ELBO, valid | -ELBO, the IS images | -log p(x), IS | epochs | train seconds | images / s |", "|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['name']} | {-r['elbo']:.2f} | {-r['elbo_subset']:.2f} | {-r['log_likelihood']:.2f} | {r['epochs']} | "
                     f"{r['train_seconds']:.0f} | {r['examples_per_second']:.0f} |")
    return lines + ["", f"Published: {DRAW_ANCHOR}, trained to convergence (Gregor et al. do not state the epochs); these are CPU runs of "
                    "a few epochs on the validation split."]


def air_table(section: dict[str, Any]) -> list[str]:
    lines = ["AIR. " + section["setting"], "",
             "| seed | count accuracy, valid | inferred 0 / 1 / 2 / 3 for true 0; 1; 2 | -ELBO, valid | epochs (steps) | train seconds | images / s |",
             "|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        confusion = "; ".join(" / ".join(str(n) for n in row) for row in r["confusion"])
        lines.append(f"| {r['seed']} | {100 * r['count_accuracy']:.2f}% | {confusion} | {-r['elbo']:.2f} | {r['epochs']} ({r['steps']}) | "
                     f"{r['train_seconds']:.0f} | {r['examples_per_second']:.0f} |")
    return lines + ["", f"Published: {AIR_ANCHOR}. The -ELBO is of a density (Gaussian pixels), not comparable with the binary models' nats."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="draw,air", help="comma-separated: draw, air")
    parser.add_argument("--epochs", type=int, default=3, help="DRAW's epochs")
    parser.add_argument("--samples", type=int, default=100, help="importance samples per validation image (DRAW)")
    parser.add_argument("--examples", type=int, default=500, help="validation images scored by IS (DRAW; the ELBO is on all)")
    parser.add_argument("--no-attention", action="store_true", help="also DRAW without attention")
    parser.add_argument("--air-epochs", type=int, default=10, help="AIR's epochs (781 steps each)")
    parser.add_argument("--seeds", default="0,1,2", help="AIR's training seeds")
    parser.add_argument("--out", default="/tmp/pyrovae-attention-benchmark")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "attention.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result = result if "rows" not in result else {"draw": result}  # the DRAW-only format of before
    models = [m for m in args.models.split(",") if m]
    sections = {"draw": (draw_section, draw_table), "air": (air_section, air_table)}
    unknown = [m for m in models if m not in sections]
    if unknown:
        parser.error(f"unknown --models {', '.join(unknown)}: choose from draw, air")
    for name in models:
        result[name] = sections[name][0](args)
    lines = [line for name, (_, table) in sections.items() if name in result for line in [*table(result[name]), ""]]
    write_results("attention", result, "\n".join(lines))


if __name__ == "__main__":
    main()
