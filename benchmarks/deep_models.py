"""Deeper generative models (Kingma & Welling 2019, ch. 4) on static binarized MNIST.

Trains each model family with `pyrovae.experiment.fit` for a fixed number of epochs and scores
it on the validation split by the ELBO and the importance-sampled log p(x) with K samples
(sec. 2.6); fully observed models (made, realnvp) are scored exactly (their guide samples
nothing, so ELBO = log p(x)). Writes benchmarks/results/deep_models.{json,md} and the README
table (between `<!-- results:deep_models -->` markers, if the README has them).

    python benchmarks/deep_models.py --epochs 10 --samples 5000
    python benchmarks/deep_models.py --epochs 1 --train-subset 2000 --samples 50 --valid-examples 200   # smoke

Published figures are *test* NLL (we report validation: the test split is not provided),
after far longer training (thousands of epochs), with the authors' architectures; see the
`differences` column of each row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from readme import update_readme  # noqa: E402

import pyrovae.experiment as experiment_module  # noqa: E402
from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.evaluate import evaluate  # noqa: E402
from pyrovae.experiment import Config, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> (Config overrides, published test NLL or None, differences from the published setting)
FAMILIES: dict[str, tuple[dict[str, Any], str | None, str]] = {
    "vae": (
        dict(model="vae", guide="diagonal", latent=50),
        None,
        "one stochastic layer, the reference point",
    ),
    "hvae-bottom-up": (
        dict(model="hierarchical", guide="bottom-up", layers=2, model_options={"latents": [100, 50]}),
        "88.08 (IWAE paper, 2-layer VAE)",
        "200-200 tanh MLPs for every conditional (paper: 200-200 then 100-100), no 3280-pass schedule",
    ),
    "hvae-top-down": (
        dict(model="hierarchical", guide="top-down", layers=2, warmup=1.0, model_options={"latents": [100, 50]}),
        None,
        "ladder-VAE inference (precision-weighted), 1 epoch of KL warm-up, no batch norm (paper: batch norm, 200 epochs of warm-up)",
    ),
    "hvae-top-down-free-bits": (
        dict(model="hierarchical", guide="top-down", layers=2, free_bits=4.0, model_options={"latents": [100, 50]}),
        None,
        "the same with free bits (4 nats per layer, Kingma et al. 2016) instead of warm-up",
    ),
    "hvae-iwae": (
        dict(model="hierarchical", guide="bottom-up", layers=2, objective="iwae", model_options={"latents": [100, 50]}),
        "85.32 (IWAE paper, 2-layer IWAE k=50)",
        "K = --iwae-k particles (paper 50)",
    ),
    "vae-vampprior": (
        dict(model="vae", guide="diagonal", latent=40, prior="vampprior", model_options={"pseudo_inputs": 500}),
        "85.57 (VampPrior paper, one layer)",
        "tanh MLP 200-200 without gating, the prior has its own encoder (paper shares the guide's), no warm-up",
    ),
    "vae-flow-prior": (
        dict(model="vae", guide="diagonal", latent=50, prior="flow"),
        None,
        "4 affine coupling layers on z",
    ),
    "vae-pixelcnn": (
        dict(model="vae", guide="diagonal", latent=50, decoder="pixelcnn"),
        "<= 80.64 (PixelVAE)",
        "3 residual mask-B layers of 32 channels (paper: gated, deeper), MLP encoder",
    ),
    "hvae-pixelcnn-vampprior": (
        dict(model="hierarchical", guide="top-down", layers=2, prior="vampprior", decoder="pixelcnn",
             model_options={"latents": [40, 40], "pseudo_inputs": 500}),
        "79.78 (VampPrior paper, PixelHVAE + VampPrior)",
        "top-down inference instead of the paper's bottom-up, small PixelCNN",
    ),
    "made": (
        dict(model="made", guide="none", hidden=(500,), activation="relu"),
        None,
        "one ordering, one mask, 500 hidden units; exact log p(x)",
    ),
    "realnvp": (
        dict(model="realnvp", guide="none", hidden=(200, 200)),
        None,
        "uniformly dequantized binary pixels: a lower bound on the discrete log p(x)",
    ),
}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def subset_loader(train_subset: int | None):
    """`load_dataset` with the training split cut to its first `train_subset` images."""

    def load(*args: Any, **kwargs: Any):
        data = load_dataset(*args, **kwargs)
        if not train_subset:
            return data
        train = data.splits["train"]
        cut = dataclasses.replace(train, x=train.x[:train_subset])
        return dataclasses.replace(data, splits={**data.splits, "train": cut})

    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=5000, help="importance samples K for log p(x)")
    parser.add_argument("--valid-examples", type=int, default=10000)
    parser.add_argument("--train-subset", type=int, default=None, help="train on the first N images only (smoke tests)")
    parser.add_argument("--models", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--iwae-k", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="deep_models", help="results file stem and README section")
    parser.add_argument("--merge", action="store_true", help="keep the previous results' rows of families not run now")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown model families {unknown}: choose from {', '.join(FAMILIES)}")
    experiment_module.load_dataset = subset_loader(args.train_subset)  # fit() loads through this name

    rows = []
    for name in names:
        overrides, published, differences = FAMILIES[name]
        overrides = dict(overrides)
        if overrides.get("objective") == "iwae":
            overrides["particles"] = args.iwae_k
        config = Config(dataset="binarized-mnist", data_dir=args.data_dir, hidden=overrides.pop("hidden", (200, 200)),
                        activation=overrides.pop("activation", "tanh"), batch_size=args.batch_size, lr=args.lr,
                        epochs=args.epochs, eval_samples=0, seed=args.seed, device=args.device, **overrides)
        print(f"[{name}] training {args.epochs} epochs ...", flush=True)
        experiment, metrics = fit(config, progress=False)
        valid = experiment.split("valid")[: args.valid_examples]
        experiment.model.eval(), experiment.guide.eval()
        exact = config.guide == "none"
        start = time.perf_counter()
        result = evaluate(experiment.model, experiment.guide, list(valid.split(500 if not exact else 2000)), num_samples=1 if exact else args.samples)
        row = {
            "family": name, "model": config.model, "guide": config.guide, "objective": config.objective,
            "particles": config.particles, "prior": config.prior, "decoder": config.decoder,
            "epochs": metrics["epochs"], "train_images": len(experiment.data.split("train")),
            "train_seconds": metrics["train_seconds"], "examples_per_second": metrics["examples_per_second"],
            "elbo": result.elbo.mean().item(), "log_likelihood": result.log_likelihood.mean().item(),
            "num_samples": 1 if exact else args.samples, "exact": exact,
            "scoring": ("dequantized lower bound" if config.model == "realnvp" else "exact") if exact else f"IS-{args.samples}",
            "eval_seconds": time.perf_counter() - start,
            "published": published, "differences": differences,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)

    previous = RESULTS / f"{args.out}.json"
    if args.merge and previous.exists():
        fresh = {r["family"] for r in rows}
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["family"] not in fresh] + rows
        rows.sort(key=lambda r: list(FAMILIES).index(r["family"]))
    result = {
        "benchmark": "deep-models", "machine": machine(), "dataset": "binarized-mnist", "split": "valid",
        "valid_examples": min(args.valid_examples, 10000), "num_samples": args.samples, "epochs": args.epochs,
        "train_subset": args.train_subset, "batch_size": args.batch_size, "lr": args.lr,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (RESULTS / f"{args.out}.md").write_text(table)
    if not update_readme(args.out, table):
        print(f"(README.md has no <!-- results:{args.out} --> markers: table not inserted)", file=sys.stderr)
    print(table)


def markdown(result: dict) -> str:
    subset = f", first {result['train_subset']} training images" if result["train_subset"] else ""
    lines = [
        f"Static binarized MNIST, batch {result['batch_size']}, Adam {result['lr']:g}, {result['epochs']} epochs{subset}; "
        f"validation split ({result['valid_examples']} images), log p(x) by IS-{result['num_samples']} "
        f"(exact for MADE; for RealNVP a one-sample uniform-dequantization lower bound). Machine: {result['machine']}. "
        "Published figures are test NLL after much longer training; ours are validation -log p(x).",
        "",
        "| family | model / guide / objective | valid ELBO | valid log p(x) | epochs | train s | images/s | published test NLL | differences |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        objective = r["objective"] + (f" K={r['particles']}" if r["objective"] == "iwae" else "")
        lp = f"{r['log_likelihood']:.2f}" + (f" ({r['scoring']})" if r["exact"] else "")
        lines.append(
            f"| {r['family']} | {r['model']} / {r['guide']} / {objective} | {r['elbo']:.2f} | {lp} | {r['epochs']} | "
            f"{r['train_seconds']:.0f} | {r['examples_per_second']:.0f} | {r['published'] or '-'} | {r['differences']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
