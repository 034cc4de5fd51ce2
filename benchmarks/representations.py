"""Disentangled representations on dSprites (rendered by pyrovae): the plain VAE, beta-VAE,
beta-TCVAE, FactorVAE and DIP-VAE-I, several seeds each, scored by the beta-VAE score, the FactorVAE score,
MIG and DCI (`pyrovae score`), as distributions over seeds in the manner of Locatello et al.
(2019), and a latent traversal plot per objective.

    python benchmarks/representations.py --seeds 0,1,2,3,4 --epochs 5

A run directory that holds a checkpoint is resumed to its epochs, not started again; the results
file is rewritten after every run, so a stopped benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, machine, write_results

from pyrovae.experiment import Config, fit, load
from pyrovae.representations import score_run

# name -> the settings that make the objective (Locatello et al.'s grids: beta-VAE beta in
# {1, 2, 4, 6, 8, 16}, beta-TCVAE beta in {1, ..., 10}, FactorVAE gamma in {10, ..., 100}, DIP-VAE-I
# lambda_od in {1, 2, 5, 10, 20, 50} with lambda_d = 10 lambda_od)
OBJECTIVES: dict[str, dict[str, Any]] = {
    "VAE (beta = 1)": {},
    "beta-VAE, beta = 4": {"beta": 4.0},
    "beta-TCVAE, beta = 6": {"objective": "tcvae", "objective_options": {"beta": 6.0}},
    "FactorVAE, gamma = 40": {"method": "factor-vae", "method_options": {"gamma": 40.0}},
    "DIP-VAE-I, lambda_od = 10": {"objective": "dip-vae", "objective_options": {"lambda_od": 10.0}},
}
SLUG = {"VAE (beta = 1)": "vae", "beta-VAE, beta = 4": "beta-vae", "beta-TCVAE, beta = 6": "beta-tcvae", "FactorVAE, gamma = 40": "factor-vae",
        "DIP-VAE-I, lambda_od = 10": "dip-vae"}
METRICS = ("beta-vae", "factor-vae", "mig", "dci_disentanglement", "dci_completeness", "dci_informativeness_test")
ANCHOR = ("Locatello et al. (2019), sec. 5 and their figures of per-seed distributions (no single figure to quote): on dSprites, after "
          "300,000 steps of convolutional networks (10-d z, batch 64, Adam 1e-4), no objective beats the others consistently, and "
          "the random seed and the hyperparameters move every score as much as the choice of objective")


def config(name: str, seed: int, args: argparse.Namespace) -> Config:
    return Config(dataset="dsprites", dataset_options={"examples": args.examples}, latent=10, hidden=(256, 256), activation="relu",
                  batch_size=64, lr=args.lr, epochs=args.epochs, eval_samples=0, seed=seed, **OBJECTIVES[name])


def one_run(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    where = Path(args.out) / f"{SLUG[name]}-s{seed}"
    _, metrics = fit(config(name, seed, args), where, resume=(where / "checkpoint.pt").exists(), progress=False)
    experiment = load(where)
    start = time.perf_counter()
    elbo = experiment.evaluate("valid", num_samples=1, examples=args.valid).elbo.mean().item()
    scores = score_run(experiment, seed=seed, points=args.points)
    return {"objective": name, "seed": seed, "elbo": elbo, **{k: scores[k] for k in METRICS}, "epochs": metrics["epochs"],
            "train_seconds": metrics["train_seconds"], "examples_per_second": metrics.get("examples_per_second"),
            "score_seconds": time.perf_counter() - start, "run": str(where)}


def spread(values: list[float]) -> str:
    """mean ± standard deviation [min, max] over the seeds."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} [{min(values):.2f}, {max(values):.2f}]"


def table(result: dict[str, Any]) -> str:
    lines = [result["setting"], "",
             "| objective | seeds | beta-VAE score | FactorVAE score | MIG | DCI disentanglement | DCI completeness | DCI informativeness | -ELBO, valid | train s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in OBJECTIVES:
        rows = [r for r in result["rows"] if r["objective"] == name]
        if rows:
            cells = " | ".join(spread([r[m] for r in rows]) for m in METRICS)
            lines.append(f"| {name} | {len(rows)} | {cells} | {statistics.mean(-r['elbo'] for r in rows):.1f} | "
                         f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |")
    return "\n".join(lines + ["", "Each cell: mean ± standard deviation [min, max] over the seeds. Traversals of seed 0: "
                              + ", ".join(f"`benchmarks/results/representations/{SLUG[n]}-traversals.png`" for n in OBJECTIVES) + ".",
                              "", f"Published: {ANCHOR}. Differences: an MLP (256-256, ReLU) instead of their convolutional networks, "
                              f"{result['steps']} steps instead of 300,000, Adam {result['lr']:g}; the grid is pyrovae's rendering of "
                              "dSprites' factors, not DeepMind's file; DCI's importances come from random forests, not gradient-boosted trees."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--objectives", default=",".join(SLUG.values()), help=f"comma-separated: {', '.join(SLUG.values())}")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--examples", type=int, default=100000, help="grid rows drawn for training (a tenth held out)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--points", type=int, default=2000, help="training points per metric (evaluation points half)")
    parser.add_argument("--valid", type=int, default=2000, help="validation images the ELBO is scored on")
    parser.add_argument("--out", default="/tmp/pyrovae-representations-benchmark")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [n for n in OBJECTIVES if SLUG[n] in args.objectives.split(",")]
    path = RESULTS / "representations.json"
    previous = json.loads(path.read_text())["rows"] if path.exists() else []
    steps = args.epochs * -(-(args.examples - round(0.1 * args.examples)) // 64)
    setting = (f"dSprites as pyrovae renders it: {args.examples:,} grid rows drawn with seed 0, a tenth held out; the plain VAE "
               f"(10-d z, Bernoulli pixels, MLP 256-256 ReLU, diagonal Gaussian guide), batch 64, Adam {args.lr:g}, {args.epochs} epochs "
               f"({steps} steps) per run; scored with `pyrovae score --points {args.points}` (the metrics draw from the whole grid, "
               f"{args.points} training and {args.points // 2} evaluation points each, MIG on {args.points} points with 20 bins), the ELBO on "
               f"{args.valid} validation images. Machine: {machine()}.")
    rows = list(previous)
    for name in chosen:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = one_run(name, seed, args)
            rows = [r for r in rows if (r["objective"], r["seed"]) != (name, seed)] + [row]
            print(row, flush=True)
            result = {"setting": setting, "steps": steps, "lr": args.lr, "rows": rows}
            write_results("representations", result, table(result))
            if seed == 0:
                (RESULTS / "representations").mkdir(exist_ok=True)
                shutil.copy(Path(row["run"]) / "traversals.png", RESULTS / "representations" / f"{SLUG[name]}-traversals.png")


if __name__ == "__main__":
    main()
