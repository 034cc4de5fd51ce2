"""The VAE of Burda et al. (2016) trained for their full schedule: 3280 passes, and the figure at each stage.

784-200-200-50 tanh VAE on static binarized MNIST, batch 20 (theirs), `--schedule burda`
(3^i epochs at 1e-3 * 10^(-i/7), i = 0..7; Adam's epsilon 1e-4). The run directory is
trained stage by stage with `fit(..., resume=True)`: stop this script at any time and start it
again, and it goes on from the last epoch's checkpoint. After each stage the first
`--stage-examples` validation images are scored by IS-`--samples`; after the last, the whole
validation split. Writes benchmarks/results/burda_schedule.{json,md} after every stage and the
README section at the end; the finished run directory is what is committed.

    nohup python benchmarks/burda_schedule.py > burda_schedule.log 2>&1 &
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, ROOT, SHARED_DATA, machine, write_results  # noqa: E402

from pyrovae.experiment import Config, fit, load  # noqa: E402
from pyrovae.run import RunDir  # noqa: E402
from pyrovae.schedules import stage_ends  # noqa: E402

PUBLISHED = 88.71  # Burda et al. (2016), appendix D: VAE, k = 1, one stochastic layer, test split, IS-5000
CONFIG = Config(dataset="binarized-mnist", hidden=(200, 200), latent=50, activation="tanh", batch_size=20, lr=1e-3, schedule="burda",
                eval_samples=0, logs="csv", seed=0)


def score(out: Path, data_dir: str, samples: int, examples: int | None) -> dict:
    experiment = load(out, data_dir)
    torch.manual_seed(0)
    start = time.perf_counter()
    summary = experiment.evaluate("valid", samples, examples=examples).summary()
    return {"examples": summary["examples"], "elbo": summary["elbo"], "log_likelihood": summary["log_likelihood"],
            "log_likelihood_stderr": summary["log_likelihood_stderr"], "eval_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "burda-vae-3280"))
    parser.add_argument("--data-dir", default=SHARED_DATA)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--stage-examples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, results_path = Path(args.out), RESULTS / "burda_schedule.json"
    result = json.loads(results_path.read_text()) if results_path.exists() else {"stages": []}
    config = dataclasses.replace(CONFIG, data_dir=args.data_dir)
    ends = stage_ends()
    for stage, end in enumerate(ends):
        if any(row["stage"] == stage for row in result["stages"]):
            continue
        resume = RunDir(out).checkpoint.exists()
        start = time.perf_counter()
        _, metrics = fit(dataclasses.replace(config, epochs=end), out, resume=resume, progress=True, given=["epochs"] if resume else None)
        last = stage == len(ends) - 1
        scores = score(out, args.data_dir, args.samples, None if last else args.stage_examples)
        history = metrics["history"]
        row = {"stage": stage, "epochs": end, "lr": config.lr * 10 ** (-stage / 7), "train_loss": history[-1]["train_loss"],
               "valid_elbo_epoch": history[-1].get("valid_elbo"), "train_seconds_total": metrics["train_seconds"],
               "wall_seconds_this_call": time.perf_counter() - start, **scores}
        result["stages"].append(row)
        result.update(benchmark="burda-schedule", machine=machine(), config={k: v for k, v in config.to_dict().items() if k != "data_dir"},
                      num_samples=args.samples, published=PUBLISHED)
        RESULTS.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    write_results("burda_schedule", result, markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "784-200-200-50 tanh VAE, static binarized MNIST, batch 20, `--schedule burda` (Adam, epsilon 1e-4), seed 0; "
        f"IS-{result['num_samples']} on the validation split (the first 1000 images after each stage, all 10000 after the last). "
        f"Machine: {result['machine']}.",
        "",
        "| stage i | epochs | lr | valid ELBO | valid log p(x) | images scored | training hours so far |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["stages"]:
        lines.append(f"| {r['stage']} | {r['epochs']} | {r['lr']:.2e} | {r['elbo']:.2f} | {r['log_likelihood']:.2f} ± {r['log_likelihood_stderr']:.2f} | "
                     f"{r['examples']} | {r['train_seconds_total'] / 3600:.2f} |")
    lines.append(f"| published (Burda et al. 2016, app. D) | 3280 | | | -{result['published']:.2f} (test) | 10000 | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
