"""Models with attention: DRAW (Gregor et al. 2015) on static binarized MNIST at the published
MNIST architecture (T = 64 steps, 256 LSTM units, 100-d z per step, 2 x 2 read and 5 x 5 write
attention), trained by `pyrovae fit` and scored on the validation images (the test split is
withheld): the ELBO on all 10,000 and importance-sampled log p(x) with the run's guide on the
first --examples of them.

    python benchmarks/attention.py --epochs 3

A run directory that holds a checkpoint is resumed to --epochs, not started again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import SHARED_DATA, machine, write_results

from pyrovae.experiment import Config, fit, load

ANCHOR = "DRAW 80.97 nats test NLL, without attention 87.40 (Gregor et al. 2015, Table 2); public reproductions report about 82-83"


def config(epochs: int, attention: bool) -> Config:
    sizes = {"steps": 64, "state": 256, "read": 2 if attention else 0, "write": 5 if attention else 0}
    return Config(model="draw", guide="draw", dataset="binarized-mnist", data_dir=SHARED_DATA, latent=100, model_options=sizes,
                  lr=1e-3, method_options={"clip_norm": 10.0}, epochs=epochs, eval_samples=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100, help="importance samples per validation image")
    parser.add_argument("--examples", type=int, default=500, help="validation images scored by IS (the ELBO is on all)")
    parser.add_argument("--no-attention", action="store_true", help="also the variant without attention")
    parser.add_argument("--out", default="/tmp/pyrovae-attention-benchmark")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, attention in [("DRAW, 2x2 read, 5x5 write", True)] + ([("DRAW without attention", False)] if args.no_attention else []):
        where = Path(args.out) / ("draw" if attention else "draw-no-attention")
        _, metrics = fit(config(args.epochs, attention), where, resume=(where / "checkpoint.pt").exists(), progress=False)
        experiment = load(where)
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
    lines = [setting, "", "| model | -ELBO, valid | -ELBO, the IS images | -log p(x), IS | epochs | train seconds | images / s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {-r['elbo']:.2f} | {-r['elbo_subset']:.2f} | {-r['log_likelihood']:.2f} | {r['epochs']} | "
                     f"{r['train_seconds']:.0f} | {r['examples_per_second']:.0f} |")
    lines += ["", f"Published: {ANCHOR}, trained to convergence (Gregor et al. do not state the epochs); these are CPU runs of a few epochs "
              "on the validation split."]
    write_results("attention", {"setting": setting, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
