"""Semi-supervised classification with M2 (Kingma et al. 2014) against the labels alone.

For each number of labels and seed: M2 trained by `pyrovae fit` (`--model m2 --guide m2
--objective elbo-enum --fields x,y`), its test classification error, and, in the same run, a
logistic regression trained on the same labelled examples alone (scikit-learn). The published
M2 errors (Kingma et al. 2014, Table 1) go beside ours; they trained far longer.

    python benchmarks/semi_supervised.py --dataset digits --labels 50,100 --seeds 0,1,2 --epochs 100
    python benchmarks/semi_supervised.py --dataset digits --labels 50,100 --seeds 0,1,2 --epochs 100 --labelled-per-batch 50
    python benchmarks/semi_supervised.py --dataset mnist-semi --labels 100 --seeds 0 --epochs 3
    python benchmarks/semi_supervised.py --dataset mnist-semi --labels 100 --seeds 0 --epochs 10 --m1-epochs 10 --labelled-per-batch 50

With ``--m1-epochs E`` it is M1+M2: per seed a VAE (M1: latent 50, hidden 600,600 softplus, as
Kingma et al.) is trained for E epochs on the same data, and M2 on its posterior means
(``--features``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED_DATA, machine, write_results
from sklearn.linear_model import LogisticRegression

from pyrovae.data import load_dataset
from pyrovae.experiment import Config, fit

# Kingma et al. (2014), Table 1: test error (%) of M2 on MNIST, mean ± sd over runs
PUBLISHED_M2 = {100: "11.97 ± 1.71", 600: "4.94 ± 0.13", 1000: "3.60 ± 0.56", 3000: "3.92 ± 0.63"}
PUBLISHED_ADGM = {100: "0.96 ± 0.02"}  # Maaloe et al. (2016), Table 1
PUBLISHED_M1M2 = {100: "3.33 ± 0.14", 600: "2.59 ± 0.05", 1000: "2.40 ± 0.02", 3000: "2.18 ± 0.04"}


def labels_alone(dataset: str, labels: int) -> float:
    """Test error of a logistic regression fitted to the labelled training examples only."""
    data = load_dataset(dataset, SHARED_DATA, labels=labels)
    train, test = data.split("train"), data.split("test")
    kept = train.y >= 0
    clf = LogisticRegression(max_iter=5000).fit(train.x[kept].float().numpy(), train.y[kept].numpy())
    return 1 - clf.score(test.x.float().numpy(), test.y.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist-semi"])
    parser.add_argument("--labels", default="50,100")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--latent", type=int, default=None, help="default: 8 on digits, 50 on mnist-semi (Kingma et al.)")
    parser.add_argument("--hidden", default=None, help="default: 100 on digits, 500 on mnist-semi (Kingma et al.)")
    parser.add_argument("--alpha", type=float, default=None, help="classification weight per labelled example (default: 0.1 / labelled fraction)")
    parser.add_argument("--labelled-per-batch", type=int, default=0, help="K labelled examples in every batch (stratified, as Kingma et al.); 0: uniform batches")
    parser.add_argument("--model", default="m2", choices=["m2", "adgm"], help="adgm: the auxiliary deep generative model (Maaloe et al. 2016)")
    parser.add_argument("--m1-epochs", type=int, default=0, help="> 0: M1+M2, M2 on the latents of a VAE trained this many epochs first")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    big = args.dataset == "mnist-semi"
    latent = args.latent or (50 if big else 8)
    hidden = tuple(int(h) for h in (args.hidden or ("500" if big else "100")).split(","))
    rows = []
    for labels in (int(n) for n in args.labels.split(",")):
        alone = labels_alone(args.dataset, labels)
        errors, seconds, epochs = [], [], 0
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            features = None
            if args.m1_epochs:
                features = str(Path(tempfile.mkdtemp()) / "m1")
                fit(Config(dataset=args.dataset, data_dir=SHARED_DATA, dataset_options={"labels": labels}, latent=50, hidden=(600, 600), activation="softplus",
                           epochs=args.m1_epochs, eval_samples=0, seed=seed, logs="none"), features, progress=False)
            config = Config(model=args.model, guide=args.model, features=features, objective="elbo-enum", fields="x,y", dataset=args.dataset, data_dir=SHARED_DATA,
                            dataset_options={"labels": labels}, labelled_per_batch=args.labelled_per_batch, latent=latent, hidden=hidden, activation="softplus", epochs=args.epochs,
                            eval_samples=0, seed=seed, model_options={} if args.alpha is None else {"alpha": args.alpha})
            _, metrics = fit(config, progress=False)
            errors.append(100 * metrics["classification_error"])
            seconds.append(time.perf_counter() - start)
            epochs = metrics["epochs"]
            print(f"{args.dataset} {labels} labels seed {seed}: {errors[-1]:.2f}% in {seconds[-1]:.0f} s", flush=True)
        spread = f" ± {statistics.stdev(errors):.2f}" if len(errors) > 1 else ""
        rows.append({"dataset": args.dataset, "labels": labels, "seeds": len(errors), "m2_error": errors, "labels_alone_error": 100 * alone,
                     "epochs": epochs, "seconds": seconds, "cell": f"{statistics.mean(errors):.2f}{spread}"})
    name = (f"semi_supervised_{args.dataset.replace('-', '_')}" + ("_adgm" if args.model == "adgm" else "") + (f"_m1m2_{args.m1_epochs}" if args.m1_epochs else "")
            + ("" if args.alpha is None else f"_alpha{args.alpha:g}")
            + (f"_stratified{args.labelled_per_batch}" if args.labelled_per_batch else ""))
    what = (f"M1+M2 (M1: a VAE, latent 50, hidden 600,600 softplus, {args.m1_epochs} epochs; M2 on draws from its posterior, --features)"
            if args.m1_epochs else {"m2": "M2", "adgm": "ADGM"}[args.model])
    setting = (f"{what} (--model {args.model} --guide {args.model}, elbo-enum), latent {latent}, hidden {','.join(map(str, hidden))} softplus, batch 100, Adam 1e-3, "
               f"{args.epochs} epochs, alpha {'0.1 / labelled fraction' if args.alpha is None else args.alpha}, "
               f"{f'{args.labelled_per_batch} labelled examples in every batch (stratified)' if args.labelled_per_batch else 'uniform batches'}; test classification error (%), "
               f"mean ± sd over seeds. Machine: {machine()}.")
    anchor = "M1+M2" if args.m1_epochs else {"m2": "M2", "adgm": "ADGM"}[args.model]
    source = "Maaloe et al. 2016" if args.model == "adgm" and not args.m1_epochs else "Kingma et al. 2014"
    lines = [setting, "", f"| data | labels | {anchor} (ours) | labels alone (logistic regression) | {anchor}, {source} (MNIST) | seeds | epochs | seconds per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        published = (PUBLISHED_M1M2 if args.m1_epochs else PUBLISHED_ADGM if args.model == "adgm" else PUBLISHED_M2).get(r["labels"], "") if big else ""
        lines.append(f"| {r['dataset']} | {r['labels']} | {r['cell']} | {r['labels_alone_error']:.2f} | {published} | {r['seeds']} | {r['epochs']} | "
                     f"{statistics.mean(r['seconds']):.0f} |")
    write_results(name, {"setting": setting, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
