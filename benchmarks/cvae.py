"""Quadrant completion on binarized MNIST (Sohn et al. 2015): the conditional VAE against the
plain network baseline, and the model of Pyro's `examples/cvae` run side by side.

For 1, 2 and 3 given quadrants, on the same data and epochs:
- `completion-nn`: pyrovae's deterministic baseline p(x_out | x_in) (exact, `--guide none`);
- `cvae`: pyrovae's CVAE with the diagonal recognition guide q(z | x), plain (gsnn 0) and with
  Sohn's hybrid objective (gsnn 1, i.e. alpha = 0.5);
- Pyro's CVAE as its example writes it (`tests/programs/pyro_cvae.py`, through `--collate`),
  on top of its baseline network trained first by a plain PyTorch loop as Pyro's is.
Every figure is the negative conditional log-likelihood -log p(x_out | x_in) in nats per
validation image, by importance sampling with the run's own recognition model as proposal
(Sohn et al.'s CLL), beside the negative bound; the baselines' figures are exact.

    python benchmarks/cvae.py --epochs 10

A run scored before is read back from its directory (rerun the script to finish a cut one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import ROOT, SHARED_DATA, machine, write_results
from torch.nn.functional import binary_cross_entropy

from pyrovae.data import load_dataset, minibatches
from pyrovae.experiment import Config, evaluate_run, fit

PEER = ROOT / "tests" / "programs" / "pyro_cvae.py"
sys.path.insert(0, str(PEER.parent))
from pyro_cvae import BaselineNet, split_quadrants  # noqa: E402

# Pyro's examples/cvae figures (its README, as quoted in the issue): the negative Monte Carlo
# ELBO of its CVAE and the baseline's masked cross-entropy, grayscale MNIST test, 1 / 2 / 3 quadrants
PYRO_CVAE = {1: 71.8, 2: 51.0, 3: 24.2}
PYRO_BASELINE = {1: 100.4, 2: 61.9, 3: 25.4}


def train_peer_baseline(dataset: str, quadrants: int, epochs: int, path: Path, seed: int) -> tuple[float, float]:
    """Pyro's baseline, trained its way (Adam 1e-3, batch 128, masked cross-entropy); returns its
    exact negative CLL on the validation images and the training seconds."""
    torch.manual_seed(seed)
    data = load_dataset(dataset, SHARED_DATA)
    train, valid = data.split("train").x.float(), data.split("valid").x.float()
    net = BaselineNet(train.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def loss(x: torch.Tensor) -> torch.Tensor:
        xs, ys = split_quadrants(x, quadrants)
        hidden = xs == -1
        return binary_cross_entropy(net(xs)[hidden], ys[hidden], reduction="sum")

    start = time.perf_counter()
    for _ in range(epochs):
        for index in minibatches(len(train), 128, torch.Generator().manual_seed(seed)):
            optimizer.zero_grad()
            loss(train[index]).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    torch.save(net.state_dict(), path)
    with torch.no_grad():
        return sum(loss(part).item() for part in valid.split(1000)) / len(valid), seconds


def run(name: str, config: Config, out: Path, samples: int) -> dict:
    """Fit and score one run; a run scored before (its row.json) is read back, not run again."""
    done = out / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    _, metrics = fit(config, out, resume=(out / "checkpoint.pt").exists(), progress=False)
    seconds = time.perf_counter() - start
    scored = evaluate_run(out, "valid", samples)
    row = {"name": name, "epochs": metrics["epochs"], "seconds": seconds, "train_seconds": metrics["train_seconds"],
           "nll": -scored["log_likelihood"], "nll_stderr": scored.get("log_likelihood_stderr"), "neg_elbo": -scored["elbo"]}
    done.write_text(json.dumps(row))
    print(f"  {name}: -log p(x_out|x_in) {row['nll']:.2f}, -ELBO {row['neg_elbo']:.2f}, {seconds:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="binarized-mnist", choices=["binarized-mnist", "digits"], help="digits: a quick check")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quadrants", default="1,2,3")
    parser.add_argument("--samples", type=int, default=100, help="importance samples per validation image (Sohn et al.: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/pyrovae-cvae-benchmark")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(dataset=args.dataset, data_dir=SHARED_DATA, epochs=args.epochs, batch_size=128, lr=1e-3, hidden=(500, 500),
                  activation="relu", eval_samples=0, seed=args.seed, logs="none")
    rows = []
    for q in (int(n) for n in args.quadrants.split(",")):
        print(f"{q} quadrant(s) given", flush=True)
        found = {"quadrants": q}
        found["nn"] = run("completion-nn", Config(model="completion-nn", guide="none", model_options={"quadrants": q}, **common), out / f"nn-q{q}", args.samples)
        for gsnn in (0, 1):
            found[f"cvae_gsnn{gsnn}"] = run(f"cvae gsnn={gsnn}", Config(model="cvae", latent=200, model_options={"quadrants": q, "gsnn": gsnn}, **common),
                                            out / f"cvae-gsnn{gsnn}-q{q}", args.samples)
        weights = out / f"pyro-baseline-q{q}.pt"
        trained = out / f"pyro-baseline-q{q}.json"
        if not trained.exists():
            nll, seconds = train_peer_baseline(args.dataset, q, args.epochs, weights, args.seed)
            trained.write_text(json.dumps({"nll": nll, "train_seconds": seconds}))
        found["pyro_baseline"] = json.loads(trained.read_text())
        nll, seconds = found["pyro_baseline"]["nll"], found["pyro_baseline"]["train_seconds"]
        print(f"  Pyro's baseline: -log p(x_out|x_in) {nll:.2f}, {seconds:.0f} s", flush=True)
        peer = {k: v for k, v in common.items() if k not in ("hidden", "activation")}
        found["pyro_cvae"] = run("Pyro's CVAE", Config(model=f"{PEER}:CVAE.model", guide=f"{PEER}:CVAE.guide", collate=f"{PEER}:given_{q}",
                                                       model_options={"baseline": str(weights)}, **peer), out / f"pyro-cvae-q{q}", args.samples)
        rows.append(found)
    setting = (f"{args.dataset}, trained on the training images for {args.epochs} epochs (batch 128, Adam 1e-3), scored on the "
               f"validation images: -log p(x_out | x_in) in nats per image, by IS-{args.samples} with each run's recognition model "
               "(exact for the baselines), and the negative ELBO in brackets. pyrovae's networks: MLPs 500-500 ReLU, z 200, as Pyro's. "
               f"Machine: {machine()}.")
    lines = [setting, "", "| quadrants given | completion-nn (ours) | CVAE (ours) | CVAE, hybrid gsnn=1 (ours) | Pyro's baseline, same run | "
             "Pyro's CVAE, same run | Pyro README: baseline / CVAE |", "|---|---|---|---|---|---|---|"]
    cell = lambda r: f"{r['nll']:.2f} ({r['neg_elbo']:.2f})"  # noqa: E731
    for r in rows:
        q = r["quadrants"]
        lines.append(f"| {q} | {r['nn']['nll']:.2f} | {cell(r['cvae_gsnn0'])} | {cell(r['cvae_gsnn1'])} | {r['pyro_baseline']['nll']:.2f} | "
                     f"{cell(r['pyro_cvae'])} | {PYRO_BASELINE[q]} / {PYRO_CVAE[q]} |")
    lines += ["", "Pyro's README figures differ in setting: grayscale MNIST (a Bernoulli on gray levels), the test split, up to 101 epochs with "
              "early stopping, and its CVAE's figure is the negative Monte Carlo ELBO, not an importance-sampled likelihood."]
    write_results("cvae" if args.dataset == "binarized-mnist" else f"cvae_{args.dataset}", {"setting": setting, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
