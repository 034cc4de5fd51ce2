"""Data-parallel scaling: images/second and the final bound for 1, 2 and 4 ranks of `pyrovae fit --nproc`.

The 784-200-200-50 tanh VAE on static binarized MNIST, batch 100 (and 1000) per rank, Adam 1e-3, one torch
thread per rank, a few epochs. Beside each N: one process at batch N * 100 (the same steps, so
the same bound up to noise) and the ideal line (N times one rank's rate). Training images/s is
rank 0's, from its epoch times (waits for the other ranks included). With `--lightning`, also
the Lightning adapter under Trainer(strategy="ddp", devices=2), timed by a callback over its epochs.
Writes benchmarks/results/scaling.{json,md,png} and the README section.

    python benchmarks/scaling.py --ranks 1,2,4 --batch-sizes 100,1000 --epochs 3 --lightning
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, SHARED_DATA, machine, write_results  # noqa: E402

LIGHTNING = '''
import json, sys, time, warnings
import lightning.pytorch as pl
from pyrovae.experiment import Config, build
from pyrovae.distributed import leave
from pyrovae.lightning_adapter import PyrovaeModule
warnings.filterwarnings("ignore")
data_dir, epochs, devices, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = Config(dataset="binarized-mnist", data_dir=data_dir, hidden=(200, 200), latent=50, batch_size=100, epochs=epochs, eval_samples=0, logs="none")
module = PyrovaeModule(build(config))


class EpochClock(pl.Callback):
    """Training seconds per epoch, as pyrovae's epoch rows count them (no start-up, no validation)."""

    seconds = 0.0

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        EpochClock.seconds += time.perf_counter() - self.start


trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=devices, strategy="ddp", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[EpochClock()], limit_val_batches=0)  # training alone, as timed above
trainer.fit(module)
seconds = EpochClock.seconds
valid = module.experiment.evaluate("valid", num_samples=1).elbo.mean().item()  # every rank: each scores its share
if trainer.global_rank == 0:
    json.dump({"seconds": seconds, "examples_per_second": epochs * 50000 / seconds, "elbo": valid}, open(out, "w"))
leave()
'''


def fit(out: Path, data_dir: str, epochs: int, batch: int, nproc: int) -> dict:
    flags = ["fit", "--dataset", "binarized-mnist", "--data-dir", data_dir, "--epochs", str(epochs), "--batch-size", str(batch),
             "--eval-samples", "0", "--log", "none", "--quiet", "--threads", "1", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "pyrovae", *flags, *(["--nproc", str(nproc)] if nproc > 1 else [])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"examples_per_second": metrics["examples_per_second"], "elbo": metrics["history"][-1]["valid_elbo"], "train_seconds": metrics["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sizes", default="100,1000", help="batch per rank, comma-separated")
    parser.add_argument("--data-dir", default=SHARED_DATA)
    parser.add_argument("--lightning", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what each rank runs with (and what `machine` reports)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            for n in [int(r) for r in args.ranks.split(",")]:
                ranked = fit(Path(tmp) / f"ranks{n}-{batch}", args.data_dir, args.epochs, batch, n)
                row = {"ranks": n, "batch_per_rank": batch, **ranked}
                if n > 1:
                    single = fit(Path(tmp) / f"single{n}-{batch}", args.data_dir, args.epochs, batch * n, 1)
                    row.update(single_examples_per_second=single["examples_per_second"], single_elbo=single["elbo"])
                rows.append(row)
                print(json.dumps(row), flush=True)
        base = next((r["examples_per_second"] for r in rows if r["ranks"] == 1 and r["batch_per_rank"] == 100), None)
        lightning = None
        if args.lightning:
            out = Path(tmp) / "lightning.json"
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
            script = Path(tmp) / "lightning_scaling.py"  # a file: Lightning's DDP starts the other ranks by running it again
            script.write_text(LIGHTNING)
            done = subprocess.run([sys.executable, str(script), args.data_dir, str(args.epochs), "2", str(out)], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            lightning = {"ranks": 2, **json.loads(out.read_text())}
            print(json.dumps(lightning), flush=True)
    result = {"benchmark": "scaling", "machine": machine(), "cores": os.cpu_count(), "epochs": args.epochs, "rows": rows, "lightning": lightning,
              "one_rank_batch_100_examples_per_second": base, "torch": torch.__version__}
    plot(result, RESULTS / "scaling.png")
    write_results("scaling", result, markdown(result))


def plot(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for batch, colour in zip(sorted({r["batch_per_rank"] for r in result["rows"]}), ("C0", "C1", "C2")):
        rows = [r for r in result["rows"] if r["batch_per_rank"] == batch]
        ranks = [r["ranks"] for r in rows]
        ax.plot(ranks, [r["examples_per_second"] for r in rows], "o-", color=colour, label=f"--nproc N, batch {batch} per rank")
        ax.plot(ranks, [r.get("single_examples_per_second", r["examples_per_second"]) for r in rows], "s--", color=colour, alpha=0.6,
                label=f"one process at batch N x {batch}")
        one = next((r["examples_per_second"] for r in rows if r["ranks"] == 1), None)
        if one:
            ax.plot(ranks, [n * one for n in ranks], ":", color=colour, alpha=0.5, label=f"ideal (N x one rank), batch {batch}")
    ax.axvline(result["cores"], color="red", lw=0.8, label=f"{result['cores']} cores")
    ax.set(xlabel="ranks N", ylabel="training images / second", xticks=sorted({r["ranks"] for r in result["rows"]}))
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [
        f"784-200-200-50 tanh VAE, static binarized MNIST, {result['epochs']} epochs, one torch thread per rank, gloo; validation ELBO "
        f"after the last epoch. Machine: {result['machine']}, {result['cores']} cores.",
        "",
        "| batch per rank | ranks N | images/s | vs ideal (N x 1 rank) | valid ELBO | one process at batch N x B: images/s | its valid ELBO |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        one = next(o["examples_per_second"] for o in result["rows"] if o["ranks"] == 1 and o["batch_per_rank"] == r["batch_per_rank"])
        single = f"{r['single_examples_per_second']:.0f} | {r['single_elbo']:.2f}" if "single_elbo" in r else "(the same run) | -"
        lines.append(f"| {r['batch_per_rank']} | {r['ranks']} | {r['examples_per_second']:.0f} | {r['examples_per_second'] / (r['ranks'] * one):.2f} | "
                     f"{r['elbo']:.2f} | {single} |")
    lt, base = result["lightning"], result["one_rank_batch_100_examples_per_second"]
    if lt and base:
        lines.append(f"| 100 | 2, Lightning `Trainer(strategy=\"ddp\", devices=2)` | {lt['examples_per_second']:.0f} (epoch times, as above) | "
                     f"{lt['examples_per_second'] / (2 * base):.2f} | {lt['elbo']:.2f} | | |")
    return "\n".join(lines) + "\n\n![scaling](benchmarks/results/scaling.png)\n"


if __name__ == "__main__":
    main()
