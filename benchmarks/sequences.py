"""Sequence models on JSB chorales: the deep Markov model (Krishnan et al. 2017) with and without
an IAF in its guide, the variational RNN (Chung et al. 2015), and the DMM of Pyro's
`examples/dmm.py` as it writes it (`tests/programs/pyro_dmm.py`, through `--collate`), all
trained by `pyrovae fit` on the same data, epochs and optimizer, scored on the validation
chorales (the test split is withheld): nats per time step, by the ELBO and by importance
sampling with each run's guide.

    python benchmarks/sequences.py --epochs 40

A run whose directory holds its metrics is not run again (rerun the script to resume a cut one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import ROOT, SHARED_DATA, machine, write_results

from pyrovae.experiment import Config, evaluate_run, fit

PEER = ROOT / "tests" / "programs" / "pyro_dmm.py"
# published test figures, nats per time step (negative log-likelihood)
ANCHORS = "Krishnan et al. 2017 (Table 1): DMM 6.388 by IS; Pyro's dmm.py README: bound 6.87 / 6.82 / 6.80 with 0 / 1 / 2 IAFs; SRNN (Fraccaro et al. 2016) 4.74"


def runs(latent: int) -> dict[str, dict]:
    dmm = dict(model="dmm", guide="dmm", latent=latent, model_options={"transition": 200, "emission": 100})
    return {
        "dmm": {**dmm, "guide_options": {"rnn": 600}},
        "dmm, 1 IAF": {**dmm, "guide_options": {"rnn": 600, "iafs": 1, "iaf_hidden": 100}},
        "Pyro's dmm.py model": dict(model=f"{PEER}:DMM.model", guide=f"{PEER}:DMM.guide", collate=f"{PEER}:minibatch",
                                    model_options={"z_dim": latent}),
        "vrnn": dict(model="vrnn", guide="vrnn", latent=latent, model_options={"state": 256, "emission": 256}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--latent", type=int, default=100, help="z per step (Krishnan et al. and Pyro: 100)")
    parser.add_argument("--lr", type=float, default=3e-4, help="Pyro dmm.py's")
    parser.add_argument("--warmup", type=float, default=10.0, help="epochs of linear KL warm-up")
    parser.add_argument("--warmup-from", type=float, default=0.2, help="the warm-up's first KL weight (Pyro dmm.py's minimum annealing factor)")
    parser.add_argument("--samples", type=int, default=100, help="importance samples per validation chorale")
    parser.add_argument("--only", default=None, help="comma-separated run names")
    parser.add_argument("--out", default="/tmp/pyrovae-sequences-benchmark")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = []
    chosen = runs(args.latent)
    names = args.only.split(",") if args.only else list(chosen)
    for name in names:
        where = out / name.replace(" ", "_").replace(",", "").replace("'", "").replace(".", "")
        scored_file = where / "scored.json"
        if not scored_file.exists():
            config = Config(dataset="jsb-chorales", data_dir=SHARED_DATA, fields="x,lengths", epochs=args.epochs, batch_size=20, lr=args.lr,
                            warmup=args.warmup, warmup_from=args.warmup_from, eval_samples=0, seed=0, method_options={"clip_norm": 10.0}, logs="none", **chosen[name])
            start = time.perf_counter()
            resume = (where / "checkpoint.pt").exists()
            try:
                _, metrics = fit(config, where, resume=resume, progress=False)
                scored = evaluate_run(where, "valid", args.samples)
                scored.update(seconds=time.perf_counter() - start, train_seconds=metrics["train_seconds"], epochs=metrics["epochs"])
            except Exception as error:  # a peer program that fails is a result, said as one
                scored = {"failed": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            scored_file.write_text(json.dumps(scored, indent=2))
        scored = json.loads(scored_file.read_text())
        rows.append({"name": name, **scored})
        print(f"{name}: {scored.get('failed') or scored['log_likelihood_per_step']}", flush=True)
    setting = (f"JSB chorales (quarter-note), trained on the 229 training chorales for {args.epochs} epochs (batch 20, Adam {args.lr:g} with the gradient "
               f"clipped to norm 10, "
               f"KL weight warmed up from {args.warmup_from:g} to 1 over {args.warmup:g} epochs), scored on the 76 validation chorales: nats per time step (the sum over the chorales "
               f"over their summed lengths), negative ELBO and negative IS-{args.samples} log-likelihood with each run's guide. "
               f"DMMs: z 100, transition 200, emission 100, backward RNN 600 (Krishnan et al.'s and Pyro's sizes); VRNN: z {args.latent}, "
               f"state 256. Machine: {machine()}.")
    lines = [setting, "", "| model | -ELBO per step | -log p(x) per step, IS | epochs | train seconds |", "|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['name']} | failed: {r['failed'][:160]} | | | |")
            continue
        lines.append(f"| {r['name']} | {-r['elbo_per_step']:.3f} | {-r['log_likelihood_per_step']:.3f} | {r['epochs']} | {r['train_seconds']:.0f} |")
    lines += ["", f"Published (test split, {ANCHORS}) trained 5000 epochs (Pyro) with Adam 3e-4 and KL annealing over 1000 epochs "
              "from 0.2; these runs are far shorter, on the validation split."]
    write_results("sequences", {"setting": setting, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
