"""The VAE of Burda et al. (2016) on static binarized MNIST: pyrovae beside pythae and plain PyTorch.

784-200-200-50 tanh encoder and decoder, Bernoulli likelihood, batch 100, Adam 1e-3, a fixed
number of epochs; each is scored on the validation split by the ELBO and the importance-sampled
log p(x) with K samples (Kingma & Welling 2019, sec. 2.6). All three run in one process on the
same data with the same seed. Writes benchmarks/results/burda_vae.{json,md} and the README table.

    python benchmarks/burda_vae.py --epochs 10 --samples 5000
(needs pythae: see benchmarks/requirements.txt)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from common import SHARED_DATA, machine, write_results  # noqa: E402

from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.experiment import Config, fit  # noqa: E402

PUBLISHED = "88.71 nats test NLL (IWAE paper appendix D, VAE k=1, 1 stochastic layer, 3280 passes, test split, IS-5000)"


def score_pyrovae(experiment, valid: torch.Tensor, samples: int) -> dict:
    experiment.model.eval(), experiment.guide.eval()
    from pyrovae.evaluate import evaluate

    start = time.perf_counter()
    result = evaluate(experiment.model, experiment.guide, list(valid.split(500)), num_samples=samples)
    return {"elbo": result.elbo.mean().item(), "log_likelihood": result.log_likelihood.mean().item(), "eval_seconds": time.perf_counter() - start}


def score_peer(encode, decode, valid: torch.Tensor, samples: int) -> dict:
    start = time.perf_counter()
    log_px, elbo = peers.importance_sampled_log_likelihood(encode, decode, valid, num_samples=samples)
    return {"elbo": elbo.mean().item(), "log_likelihood": log_px.mean().item(), "eval_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--valid-examples", type=int, default=10000)
    parser.add_argument("--data-dir", default=SHARED_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", default="pyrovae,pythae,pytorch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="burda_vae", help="results file stem and README section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset("binarized-mnist", args.data_dir)
    train_x = data.split("train").x
    valid = data.batch("valid", torch.arange(min(args.valid_examples, len(data.split("valid")))))
    rows = []
    for name in args.peers.split(","):
        torch.manual_seed(args.seed)
        print(f"[{name}] training {args.epochs} epochs ...", flush=True)
        if name == "pyrovae":
            config = Config(dataset="binarized-mnist", data_dir=args.data_dir, hidden=(200, 200), latent=50, activation="tanh",
                            batch_size=100, lr=1e-3, epochs=args.epochs, eval_samples=0, seed=args.seed)
            experiment, metrics = fit(config, progress=False)
            trained = {"train_seconds": metrics["train_seconds"], "examples_per_second": metrics["examples_per_second"]}
            scores = score_pyrovae(experiment, valid, args.samples)
        elif name == "pythae":
            model, trained = peers.train_pythae(train_x, args.epochs, batch_size=100, lr=1e-3, seed=args.seed)
            scores = score_peer(*peers.pythae_encode_decode(model), valid, args.samples)
        elif name == "pytorch":
            model = peers.handwritten_vae()
            trained = peers.train_handwritten(model, train_x, args.epochs, batch_size=100, lr=1e-3, seed=args.seed)
            scores = score_peer(*peers.handwritten_encode_decode(model), valid, args.samples)
        else:
            raise SystemExit(f"unknown peer {name!r}")
        row = {"implementation": name, "epochs": args.epochs, **trained, **scores}
        print(json.dumps(row), flush=True)
        rows.append(row)

    result = {
        "benchmark": "burda-vae", "machine": machine(), "dataset": "binarized-mnist", "split": "valid",
        "valid_examples": len(valid), "num_samples": args.samples, "epochs": args.epochs,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "published": PUBLISHED, "rows": rows,
    }
    write_results(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    base = next((r for r in result["rows"] if r["implementation"] == "pytorch"), None)
    lines = [
        f"Static binarized MNIST, 784-200-200-50 tanh VAE, batch 100, Adam 1e-3, {result['epochs']} epochs; "
        f"validation split ({result['valid_examples']} images), IS-{result['num_samples']}. Machine: {result['machine']}.",
        "",
        "| implementation | valid ELBO | valid log p(x) | train images/s | vs PyTorch | eval seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['examples_per_second'] / base['examples_per_second']:.2f}x" if base else "-"
        lines.append(f"| {r['implementation']} | {r['elbo']:.2f} | {r['log_likelihood']:.2f} | {r['examples_per_second']:.0f} | {ratio} | {r['eval_seconds']:.0f} |")
    lines.append("| published (Burda et al. 2016) | - | -88.71 (test) | - | - | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
