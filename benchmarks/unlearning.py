"""Feature unlearning (Moon et al. 2024) on pre-trained VAEs: `pyrovae unlearn` on a digits VAE
(a class, measured by a project-trained classifier) and on a binarized-MNIST VAE (thick
strokes), reporting the feature's rate in samples, held-out log p(x) with and without the
feature, and the Fréchet distance of samples to the feature-free held-out images, before and after.

    python benchmarks/unlearning.py

Trained runs in --out are reused; the results and the README section are rewritten at the end.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, SHARED_DATA, machine, write_results

from pyrovae.batch import as_batch
from pyrovae.experiment import Config, fit, load
from pyrovae.sample_quality import feature_network, frechet_distance
from pyrovae.sampling import draw
from pyrovae.unlearning import feature, unlearn_run

ANCHOR = ("Moon, Cho & Kim (2024) report unlearning on CelebA and MNIST with their own classifiers and metrics, not on these "
          "models; no figure of theirs is comparable")
CASES = [  # (pre-trained run, its config, feature, steps)
    ("digits-vae", dict(dataset="digits", latent=8, hidden=(128,), epochs=60), "digit=3", 1000),
    ("digits-vae", dict(dataset="digits", latent=8, hidden=(128,), epochs=60), "digit=7", 1000),
    ("digits-vae", dict(dataset="digits", latent=8, hidden=(128,), epochs=60), "thick", 1000),
    ("bmnist-vae", dict(dataset="binarized-mnist", data_dir=SHARED_DATA, latent=20, hidden=(200, 200), epochs=10), "thick", 1000),
]


def pretrained(name: str, settings: dict[str, Any], out: Path) -> Path:
    where = out / name
    if not (where / "checkpoint.pt").exists():
        fit(Config(**settings, eval_samples=0), where, progress=False)
    return where


@torch.no_grad()
def frechet_to_feature_free(run: Path, target: str, num: int, seed: int) -> float:
    """FD of `num` samples of the run to the held-out images without the feature (project MLP features)."""
    experiment = load(run)
    experiment.train_mode(False)
    held_out = as_batch(experiment.split("valid")).primary
    free = held_out[~feature(target, experiment, held_out[:1000]).detect(held_out)][:num]
    network = feature_network(experiment.data, experiment.config.data_dir, seed)
    torch.manual_seed(seed)
    samples = torch.cat([draw(experiment.model, held_out[:1], min(1000, len(free) - i)) for i in range(0, len(free), 1000)])
    return frechet_distance(network.features(free), network.features(samples))


def table(result: dict[str, Any]) -> str:
    lines = [result["setting"], "",
             "| model | feature | feature rate in samples, before → after | log p(x) held out without it, before → after | "
             "log p(x) held out with it, before → after | FD to feature-free images, before → after | mean abs change: feature-free draws / "
             "reconstructions | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['feature']} | {100 * r['feature_rate_before']:.1f}% → {100 * r['feature_rate_after']:.1f}% | "
                     f"{r['log_likelihood_without_feature_before']:.2f} → {r['log_likelihood_without_feature_after']:.2f} | "
                     f"{r['log_likelihood_with_feature_before']:.2f} → {r['log_likelihood_with_feature_after']:.2f} | "
                     f"{r['fd_before']:.2f} → {r['fd_after']:.2f} | {r['mean_abs_change_feature_free_draws']:.3f} / "
                     f"{r['mean_abs_change_feature_free_reconstructions']:.3f} | {r['unlearn_seconds']:.0f} |")
    return "\n".join(lines + ["", "Sample grids before and after: `benchmarks/results/unlearning/`. Published: " + ANCHOR + "."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/pyrovae-unlearning-benchmark")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=1000, help="the user's examples (valid split) defining the feature")
    parser.add_argument("--quality-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = []
    (RESULTS / "unlearning").mkdir(parents=True, exist_ok=True)
    for name, settings, target, steps in CASES:
        run = pretrained(name, settings, out)
        unlearned = out / f"{name}-without-{target.replace('=', '')}"
        shutil.rmtree(unlearned, ignore_errors=True)
        report = unlearn_run(run, target, unlearned, steps=steps, lr=args.lr, examples=args.examples, seed=args.seed)
        row = {"model": f"{name} ({settings['dataset']}, z {settings['latent']}, {settings['epochs']} epochs)", **report,
               "fd_before": frechet_to_feature_free(run, target, args.quality_samples, args.seed),
               "fd_after": frechet_to_feature_free(unlearned, target, args.quality_samples, args.seed)}
        rows.append(row)
        print(row, flush=True)
        for when in ("before", "after"):
            shutil.copy(unlearned / f"samples-{when}.png", RESULTS / "unlearning" / f"{unlearned.name}-{when}.png")
    setting = (f"`pyrovae unlearn` with Adam {args.lr:g}, batch 100 prior draws per step; the user's examples are the first {args.examples} "
               "validation images (positive where they show the feature); feature rates on 2,000 prior draws (the same before and after); "
               "log p(x) by IS-100 with the run's encoder on those held-out images; FD on project MLP features of "
               f"{args.quality_samples} samples against as many feature-free validation images. Machine: {machine()}.")
    write_results("unlearning", {"setting": setting, "rows": rows}, table({"setting": setting, "rows": rows}))


if __name__ == "__main__":
    main()
