"""The ``pyrovae`` command: list, fit, evaluate, sample (also ``python -m pyrovae``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyrovae
from pyrovae.catalog import names, read
from pyrovae.config import Config
from pyrovae.errors import PyrovaeError
from pyrovae.files import check_writable, first_line, save_printed

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2, and takes no
    abbreviated flags (`--epoch 1` would silently be `--epochs 1`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"pyrovae: error: {message} (see {self.prog} --help)\n")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 200,200, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _option(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as JSON or a Python literal (true/True, null/None, [200, 200]), else a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for parse in (json.loads, ast.literal_eval):
        try:
            return key.replace("-", "_"), parse(value)
        except (ValueError, SyntaxError):
            continue
    return key.replace("-", "_"), value


def _default(name: str) -> str:
    """A fit flag's default, as `Config` holds it."""
    value = next(f.default for f in dataclasses.fields(Config) if f.name == name)
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyrovae", description="Deep latent-variable models as Pyro programs (Kingma & Welling 2019).",
                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"pyrovae {pyrovae.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    threads = _Parser(add_help=False)
    threads.add_argument("--threads", type=int, help=f"torch CPU threads (default {DEFAULT_THREADS}: as fast for models this small, and the same answer on a busy machine)")
    add = lambda name, **kw: sub.add_parser(name, formatter_class=_Formatter, **kw)  # noqa: E731

    p = add("list", help="models, guides, objectives, inference methods and data sets")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    # No argparse defaults here: a flag left out is None, Config holds the defaults (shown in the
    # help), and --resume can tell the flags given (checked against the saved config) from the rest.
    d = _default
    p = add("fit", help="train a model and write a run directory", parents=[threads])
    p.add_argument("--model", help=f"a registered model ({names('models')}) or your own Pyro program: path/to/script.py:NAME or package.module:NAME (default: {d('model')})")
    p.add_argument("--guide", help=f"a registered guide ({names('guides')}) or your own: path/to/script.py:NAME (default: {d('guide')})")
    p.add_argument("--method", help=f"inference method: {names('methods')} (default: {d('method')})")
    p.add_argument("--objective", help=f"{names('objectives')}; elbo-enum sums enumerated discrete sites (default: {d('objective')})")
    p.add_argument("--objective-option", type=_option, action="append", metavar="KEY=VALUE", help="objective option, e.g. beta=6 (tcvae)")
    p.add_argument("--features", metavar="RUN", help="train on RUN's encoder posterior of the data set's examples (a draw per training batch, "
                   "the means held out), labels kept (M1+M2: --model m2 on the latents of a VAE trained first, Kingma et al. 2014)")
    p.add_argument("--fields", help=f"the data's fields the model takes, in order (x, y, lengths, mask), e.g. x,y for model(xs, ys) (default: {d('fields')})")
    p.add_argument("--plate", help="the model's per-example plate (default: 'data', else the plate sized like the data)")
    p.add_argument("--collate", metavar="FILE.py:NAME", help="collate(args, kwargs) -> (args, kwargs): derived arguments built from each sliced batch (a packed sequence)")
    p.add_argument("--unlabelled", choices=("label", "omit"), help="how an example without a label reaches the program: label passes its label -1; "
                   "omit calls the program on the unlabelled examples apart, without the label, so it takes its default (model(xs, ys=None), "
                   f"as in Pyro's ss_vae_M2) (default: {d('unlabelled')})")
    p.add_argument("--particles", type=int, help=f"samples per example in the objective (K of iwae) (default: {d('particles')})")
    p.add_argument("--dataset", help=f"a registered data set ({names('datasets')}) or a .npy/.npz/.pt file of your own (default: {d('dataset')})")
    p.add_argument("--data-option", type=_option, action="append", metavar="KEY=VALUE", help="data set option, e.g. binarize=false (digits), binarize=dynamic (mnist)")
    p.add_argument("--data-dir", help="where data sets are read from and downloaded to (default: $PYROVAE_DATA or ~/.cache/pyrovae)")
    p.add_argument("--likelihood", help=f"{names('likelihoods')} (default: from the data: bernoulli for binary, continuous-bernoulli for grayscale)")
    p.add_argument("--latent", type=int, help=f"size of z (default: {d('latent')})")
    p.add_argument("--hidden", type=_sizes, help=f"hidden layer sizes of the networks, e.g. 200,200 (default: {d('hidden')})")
    p.add_argument("--activation", help=f"the networks' nonlinearity: tanh, relu, elu, softplus, gelu, sigmoid (default: {d('activation')})")
    p.add_argument("--layers", type=int, help="stochastic layers (the hierarchical model; default: its own, 2)")
    p.add_argument("--prior", help=f"prior on z: {names('priors')} (default: {d('prior')})")
    p.add_argument("--decoder", help=f"decoder family: {names('decoders')} (default: {d('decoder')})")
    p.add_argument("--free-bits", type=float, help=f"free bits per latent site, nats (Kingma et al. 2016) (default: {d('free_bits')})")
    p.add_argument("--model-option", type=_option, action="append", metavar="KEY=VALUE", help="any other model constructor option")
    p.add_argument("--guide-option", type=_option, action="append", metavar="KEY=VALUE", help="guide option, e.g. flow_steps=4")
    p.add_argument("--method-option", type=_option, action="append", metavar="KEY=VALUE", help="method option, e.g. variant=rws, covariance=full")
    p.add_argument("--epochs", type=int, help=f"passes over the training split (default: {d('epochs')})")
    p.add_argument("--batch-size", type=int, help=f"examples per minibatch (default: {d('batch_size')})")
    p.add_argument("--labelled-per-batch", type=int, metavar="K",
                   help="K labelled examples in every minibatch, the rest unlabelled, weighted to stay unbiased (M2 as Kingma et al. train it; "
                        f"default: {d('labelled_per_batch')}, uniform minibatches)")
    p.add_argument("--lr", type=float, help=f"Adam's learning rate, in (0, 1] (default: {d('lr')})")
    p.add_argument("--schedule", help=f"learning rate over epochs: constant, or burda (Burda et al. 2016: 3^i epochs at --lr * 10^(-i/7), "
                   f"i = 0..7, 3280 in all, Adam's epsilon 1e-4) (default: {d('schedule')})")
    p.add_argument("--warmup", type=float, help=f"epochs of linear KL warm-up (default: {d('warmup')})")
    p.add_argument("--warmup-from", type=float, metavar="W",
                   help=f"the warm-up's first weight, a fraction of --beta in [0, 1] (Pyro's dmm.py: 0.2) (default: {d('warmup_from')})")
    p.add_argument("--beta", type=float, help=f"weight of the latent sites after warm-up: the beta-VAE (Higgins et al. 2017) (default: {d('beta')})")
    p.add_argument("--patience", type=int, help="early stopping: epochs without validation improvement (default: none)")
    p.add_argument("--eval-samples", type=int, help=f"importance samples for the final log p(x); 0 skips it (default: {d('eval_samples')})")
    p.add_argument("--seed", type=int, help=f"random seed, 0 .. 2**32-1 (default: {d('seed')})")
    p.add_argument("--device", help=f"cpu or cuda (default: {d('device')})")
    p.add_argument("--eager", action="store_true", default=None, help="run the Pyro program every step (no captured graph; for debugging)")
    p.add_argument("--out", help="run directory (default: runs/MODEL-GUIDE-DATASET-TIME)")
    p.add_argument("--nproc", type=int, help="data-parallel processes on this machine (torch.distributed: gloo on CPUs, NCCL on GPUs), each at "
                   "--batch-size, one torch thread each; the same run as torchrun --nproc-per-node N -m pyrovae fit ... (default: 1)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped, with its saved settings (only --epochs, --eval-samples, --device and --data-dir may differ)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no log lines; the final table only")
    p.add_argument("--log", help="live metrics per epoch in the run directory: csv (log.csv), tensorboard (tensorboard/, with the tensorboard "
                   "package), both comma-separated, or none (default: csv,tensorboard; tensorboard where installed)")

    p = add("evaluate", help="ELBO and importance-sampled (or annealed) log p(x) of a run", parents=[threads])
    p.add_argument("run", help="a run directory written by fit")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="the split to score")
    p.add_argument("--samples", type=int, default=1000, help="importance samples per example (--estimator is)")
    p.add_argument("--estimator", default="is", choices=["is", "ais"], help="is: importance sampling with the run's guide (or a fitted proposal); "
                   "ais: annealed importance sampling, the same for any method")
    p.add_argument("--proposal", default="auto", choices=["auto", "guide", "fitted"], help="--estimator is: the run's guide, a Gaussian "
                   "fitted per example with the decoder frozen, or auto: the guide where it gives an ELBO, else fitted")
    p.add_argument("--proposal-steps", type=int, default=100, help="Adam steps fitting each example's proposal (--proposal fitted)")
    p.add_argument("--ais-steps", type=int, default=500, help="AIS annealing steps T")
    p.add_argument("--chains", type=int, default=16, help="AIS chains per example K")
    p.add_argument("--leapfrog", type=int, default=10, help="leapfrog steps per AIS transition")
    p.add_argument("--ais-start", default="prior", choices=["prior", "guide"], help="anneal from the prior or from the run's guide")
    p.add_argument("--bdmc", type=int, default=0, metavar="N", help="with --estimator ais: the BDMC sandwich on N examples simulated from the model")
    p.add_argument("--data-dir", help="where the run's data set is read from (default: the run's own)")
    p.add_argument("--device", help="cpu or cuda (default: the run's own)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = add("score", help="disentanglement metrics of a run's encoder (dsprites), or the quality of its samples (binary images)", parents=[threads])
    p.add_argument("run", help="a run directory written by fit")
    p.add_argument("--metrics", help="comma-separated: beta-vae, factor-vae, mig, dci (data with ground-truth factors), samples: the Fréchet "
                   "distance, precision and recall on a project classifier's features (default: all that apply)")
    p.add_argument("--points", type=int, help="training points per disentanglement metric, evaluation points half as many (default: Locatello et al.'s 10000 and 5000)")
    p.add_argument("--samples", type=int, default=5000, help="model draws and held-out images the sample metrics compare")
    p.add_argument("--seed", type=int, default=0, help="random seed of the metrics' draws")
    p.add_argument("--data-dir", help="where the run's data set is read from (default: the run's own)")
    p.add_argument("--device", help="cpu or cuda (default: the run's own)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")

    p = add("unlearn", help="fine-tune a run's decoder to stop drawing a feature, into a new run (Moon et al. 2024)", parents=[threads])
    p.add_argument("run", help="a run directory written by fit")
    p.add_argument("--feature", required=True, help="thick (the top tenth of mean ink) or digit=K (a class, for data sets with labels)")
    p.add_argument("--out", required=True, help="the new run directory (must not exist)")
    p.add_argument("--steps", type=int, default=1000, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate")
    p.add_argument("--batch-size", type=int, default=100, help="prior draws per step")
    p.add_argument("--examples", type=int, default=1000, help="the user's examples: the first N of the valid split, positive where they show the feature")
    p.add_argument("--samples", type=int, default=2000, help="prior draws the feature rate is measured on")
    p.add_argument("--is-samples", type=int, default=100, help="importance samples per held-out example for log p(x)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--data-dir", help="where the run's data set is read from (default: the run's own)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = add("sample", help="a grid of samples from a trained run", parents=[threads])
    p.add_argument("run", help="a run directory written by fit")
    p.add_argument("--num", type=int, default=64, help="samples to draw")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", help="PNG path (default: RUN/samples.png)")
    p.add_argument("--data-dir", help="where the run's data set is read from (default: the run's own)")

    p = add("compare", help="train several inference methods on one budget and compare held-out log p(x); or --gaps RUN", parents=[threads])
    p.add_argument("--gaps", metavar="RUN", help="instead: the approximation and amortization gaps of a trained run")
    p.add_argument("--model", default="vae", help="a registered model, or your own: path/to/script.py:NAME or package.module:NAME")
    p.add_argument("--guide", default="diagonal", help="the amortized arms' guide: a registered guide or path/to/script.py:NAME")
    p.add_argument("--objective", default="elbo", help=names("objectives"))
    p.add_argument("--dataset", default="digits", help=f"{names('datasets')}, or a .npy/.npz/.pt file")
    p.add_argument("--fields", default="x", help="the data's fields the model takes, in order, e.g. x,y for model(xs, ys)")
    p.add_argument("--plate", help="the model's per-example plate (default: 'data', else the plate sized like the data)")
    p.add_argument("--data-option", type=_option, action="append", metavar="KEY=VALUE", help="data set option, as for fit")
    p.add_argument("--model-option", type=_option, action="append", metavar="KEY=VALUE", help="model constructor option, as for fit")
    p.add_argument("--guide-option", type=_option, action="append", metavar="KEY=VALUE", help="the amortized arms' guide option, as for fit")
    p.add_argument("--methods", default="amortized,local,mcmc-em,map,wake-sleep", help="comma-separated; options as NAME:KEY=VALUE, e.g. wake-sleep:variant=rws")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--budget", type=float, help="training seconds per method")
    group.add_argument("--steps", type=int, help="minibatch steps per method")
    p.add_argument("--out", default="compare", help="directory for compare.md/.csv/.json/.png and one run per method")
    p.add_argument("--latent", type=int, default=10, help="size of z")
    p.add_argument("--hidden", type=_sizes, default=(200,), help="hidden layer sizes, e.g. 200,200")
    p.add_argument("--batch-size", type=int, default=100, help="examples per minibatch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--checkpoints", type=int, default=4, help="points on each method's anytime curve")
    p.add_argument("--eval-examples", type=int, default=200, help="held-out examples scored")
    p.add_argument("--proposal-steps", type=int, default=100, help="Adam steps fitting each held-out example's proposal")
    p.add_argument("--samples", type=int, default=100, help="importance samples per held-out example")
    p.add_argument("--ais-steps", type=int, default=200, help="AIS annealing steps scoring every decoder (0: IS only)")
    p.add_argument("--chains", type=int, default=8, help="AIS chains per example")
    p.add_argument("--leapfrog", type=int, default=5, help="leapfrog steps per AIS transition")
    p.add_argument("--bdmc", type=int, default=32, metavar="N", help="BDMC sandwich on N examples simulated from each trained model (0: none)")
    p.add_argument("--split", default="valid", help="the split --gaps scores")
    p.add_argument("--data-dir", help="where data sets are read from (default: $PYROVAE_DATA or ~/.cache/pyrovae)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


class _Formatter(argparse.HelpFormatter):
    """Shows each flag's default where the parser holds one (fit's are in its help texts)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        return f"{text} (default: {shown})"


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"  {k.ljust(width)}  {fmt(v)}" for k, v in rows)


def _list(args: argparse.Namespace) -> None:
    listing = read()
    if args.json:
        print(json.dumps({"pyrovae": pyrovae.__version__, **listing}, indent=2))
        return
    for kind, entries in listing.items():
        print(f"{kind}:")
        width = max(len(e["name"]) for e in entries)
        for e in entries:
            shapes = f" [latents: {e['latent_shapes']}]" if "latent_shapes" in e else ""
            print(f"  {e['name'].ljust(width)}  {e['description']}{shapes}")


def _pairs(pairs: list[tuple[str, Any]] | None) -> dict[str, Any] | None:
    return None if pairs is None else dict(pairs)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields set by the flags the user gave (a flag left out is None)."""
    fields = dict(
        model=args.model, guide=args.guide, method=args.method, objective=args.objective, dataset=args.dataset,
        dataset_options=_pairs(args.data_option), data_dir=args.data_dir, likelihood=args.likelihood, latent=args.latent,
        hidden=args.hidden, activation=args.activation, layers=args.layers, prior=args.prior, decoder=args.decoder,
        free_bits=args.free_bits, model_options=_pairs(args.model_option), guide_options=_pairs(args.guide_option),
        method_options=_pairs(args.method_option), epochs=args.epochs, batch_size=args.batch_size, labelled_per_batch=args.labelled_per_batch, lr=args.lr,
        schedule=args.schedule,
        particles=args.particles, warmup=args.warmup, warmup_from=args.warmup_from, beta=args.beta, objective_options=_pairs(args.objective_option), patience=args.patience, seed=args.seed,
        eval_samples=args.eval_samples, device=args.device, capture=None if args.eager is None else not args.eager,
        fields=args.fields, plate=args.plate, collate=args.collate, unlabelled=args.unlabelled, logs=args.log, features=args.features,
    )
    return {name: value for name, value in fields.items() if value is not None}


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line less its --nproc flag, for the ranks to run."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _default_out(config: Config) -> str:
    name = lambda spec: spec.rpartition(":")[2] or spec  # noqa: E731  (a user's script.py:NAME is named by NAME)
    return f"runs/{name(config.model)}-{name(config.guide)}-{Path(config.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fit(args: argparse.Namespace) -> int:
    given = _given(args)
    config = Config(**given)
    if args.resume and not args.out:
        raise PyrovaeError("--resume needs --out RUN, the run directory to continue")
    if args.nproc is not None and args.nproc < 1:
        raise PyrovaeError(f"--nproc must be positive, got {args.nproc}")
    if (args.nproc or 1) > 1 and "WORLD_SIZE" not in os.environ:
        from pyrovae.launch import launch

        config.check()  # bad settings are refused once, here, not by every rank
        named = [] if args.out else ["--out", _default_out(config)]  # every rank writes (rank 0) or reads the same directory
        return launch([*_without_nproc(args.argv), *named], args.nproc, args.threads or DEFAULT_THREADS)
    from pyrovae import distributed
    from pyrovae.experiment import fit

    out = args.out or _default_out(config)
    _, metrics = fit(config, out, resume=args.resume, progress=not args.quiet, given=given)
    group = distributed.current()
    distributed.leave()
    if group is not None and not group.main:
        return 0
    rows = [
        ("run", out), ("model / guide", f"{metrics['model']} / {metrics['guide']}"), ("method / objective", f"{metrics['method']} / {metrics['objective']}"),
        ("epochs", metrics["epochs"]), ("train seconds", metrics["train_seconds"]), ("examples / second", metrics["examples_per_second"]),
    ]
    if metrics["elbo"] is not None:
        rows.append((f"{metrics['split']} ELBO (nats/example)", metrics["elbo"]))
    if metrics["log_likelihood"] is not None:
        rows.append((f"{metrics['split']} {metrics['scores']}, IS-{metrics['num_samples']}", metrics["log_likelihood"]))
    if "log_likelihood_per_step" in metrics:
        rows.append(("per time step: ELBO / IS", f"{metrics['elbo_per_step']:.4f} / {metrics['log_likelihood_per_step']:.4f}"))
    if "classification_error" in metrics:
        rows.append((f"{metrics['classification_split']} classification error", f"{100 * metrics['classification_error']:.2f}%"))
    if "count_accuracy" in metrics:
        rows.append((f"{metrics['count_split']} count accuracy (one guide draw)", f"{100 * metrics['count_accuracy']:.2f}%"))
    print(_table(rows))
    return 0


def _evaluate(args: argparse.Namespace) -> None:
    from pyrovae.ais import AISSettings
    from pyrovae.experiment import evaluate_run
    annealing = AISSettings(steps=args.ais_steps, chains=args.chains, leapfrog=args.leapfrog, warmup=min(100, max(args.ais_steps, 0)), start=args.ais_start)
    if args.proposal_steps < 0:
        raise PyrovaeError(f"--proposal-steps must be >= 0, got {args.proposal_steps}")
    metrics = evaluate_run(args.run, args.split, args.samples, args.data_dir, args.device, args.estimator, annealing, args.bdmc,
                           args.proposal, args.proposal_steps)
    name = f"eval-{args.split}-{args.samples}.json" if args.estimator == "is" else f"eval-{args.split}-ais-{args.ais_steps}x{args.chains}.json"
    _show_evaluation(args, metrics)
    save_printed(Path(args.run) / name, metrics)


def _show_evaluation(args: argparse.Namespace, metrics: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    head = [("run", args.run), ("split / examples", f"{args.split} / {metrics['examples']}")]
    if args.estimator == "ais":
        rows = [*head, (f"{metrics['scores']}, AIS T={args.ais_steps} K={args.chains} from the {args.ais_start}", metrics["log_likelihood"]),
                ("Monte Carlo standard error", metrics["stderr"]), ("HMC acceptance rate", metrics["accept_rate"]), ("seconds", metrics["eval_seconds"])]
        if args.bdmc:
            rows += [(f"BDMC on {metrics['bdmc_examples']} simulated: lower / upper", f"{metrics['bdmc_lower']:.3f} / {metrics['bdmc_upper']:.3f}"),
                     ("BDMC width (upper - lower)", metrics["bdmc_width"]), ("BDMC seconds", metrics["bdmc_seconds"])]
        print(_table(rows))
        return
    if metrics["log_likelihood"] is None:  # a model with global latents: the data set's bound only
        print(_table([*head, (f"ELBO (nats/example, {args.samples} draws)", metrics["elbo"]), ("Monte Carlo standard error", metrics["elbo_stderr"]),
                      ("log p(x)", f"not reported: {metrics['log_likelihood_refused']}"), ("seconds", metrics["eval_seconds"])]))
        return
    se = lambda key: metrics[key] if metrics.get(f"{key}_stderr") is None else f"{metrics[key]:.3f} ± {metrics[f'{key}_stderr']:.3f}"  # noqa: E731
    print(_table([
        *head, ("proposal", metrics["proposal"]), ("nats per example", "mean ± standard error over the examples"),
        ("ELBO", se("elbo")), (f"{metrics['scores']}, IS-{args.samples}", se("log_likelihood")),
        (f"gap {metrics['scores']} - ELBO", se("gap")), ("seconds", metrics["eval_seconds"]),
        *([("per time step: ELBO / IS", f"{metrics['elbo_per_step']:.4f} / {metrics['log_likelihood_per_step']:.4f}")]
          if "log_likelihood_per_step" in metrics else []),
        *([("active units", f"{metrics['active_units']} of {metrics['total_units']}")] if "active_units" in metrics else []),
        *([("classification error", f"{100 * metrics['classification_error']:.2f}%")] if "classification_error" in metrics else []),
        *([("count accuracy (one guide draw)", f"{100 * metrics['count_accuracy']:.2f}%")] if "count_accuracy" in metrics else []),
    ]))


def _sample(args: argparse.Namespace) -> None:
    import pyro

    from pyrovae.experiment import load
    from pyrovae.plots import image_grid
    from pyrovae.sampling import sample

    if args.num < 1:
        raise PyrovaeError(f"--num must be positive, got {args.num}")
    out = Path(args.out) if args.out else Path(args.run) / "samples.png"
    check_writable(out.parent)
    experiment = load(args.run, args.data_dir)
    if experiment.data.image_shape is None:
        raise PyrovaeError(f"{experiment.config.dataset} is not an image data set: nothing to draw")
    pyro.set_rng_seed(args.seed)
    experiment.train_mode(False)
    images = sample(experiment.model, experiment.split("train")[:1], args.num)
    image_grid(images, experiment.data.image_shape, out, f"{args.num} samples")
    print(out)


def _score(args: argparse.Namespace) -> None:
    from pyrovae.experiment import load
    from pyrovae.representations import METRICS, score_run
    from pyrovae.sample_quality import score_samples

    experiment = load(args.run, args.data_dir, args.device)
    default = [*METRICS] if experiment.data.ground_truth is not None else ["samples"]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else default
    unknown = [m for m in metrics if m not in (*METRICS, "samples")]
    if unknown:
        raise PyrovaeError(f"unknown metric {unknown[0]!r}; known: {', '.join((*METRICS, 'samples'))}")
    chosen = [m for m in metrics if m != "samples"]
    result = {**(score_run(experiment, chosen, seed=args.seed, points=args.points) if chosen else {}),
              **(score_samples(experiment, args.samples, args.seed) if "samples" in metrics else {})}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table([("run", args.run), *[(k, v) for k, v in result.items() if k not in ("model", "guide", "method", "objective", "dataset")]]))
    save_printed(Path(args.run) / f"scores-{args.seed}.json", result)


def _unlearn(args: argparse.Namespace) -> None:
    from pyrovae.unlearning import unlearn_run

    check_writable(Path(args.out).resolve().parent)
    result = unlearn_run(args.run, args.feature, args.out, steps=args.steps, lr=args.lr, batch_size=args.batch_size, examples=args.examples,
                         samples=args.samples, is_samples=args.is_samples, seed=args.seed, data_dir=args.data_dir)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    rows = [("run / unlearned run", f"{args.run} / {args.out}"), ("feature", result["feature"]),
            ("feature rate in samples: before / after", f"{100 * result['feature_rate_before']:.2f}% / {100 * result['feature_rate_after']:.2f}%")]
    for part in ("without", "with"):
        if result[f"log_likelihood_{part}_feature_before"] is not None:
            rows.append((f"log p(x), {result[f'held_out_{part}_feature']} held out {part} it: before / after",
                         f"{result[f'log_likelihood_{part}_feature_before']:.2f} / {result[f'log_likelihood_{part}_feature_after']:.2f}"))
    rows += [("mean |change| of feature-free draws", result["mean_abs_change_feature_free_draws"]),
             ("mean |change| of feature-free reconstructions", result["mean_abs_change_feature_free_reconstructions"]), ("seconds", result["unlearn_seconds"])]
    print(_table(rows))


def _compare(args: argparse.Namespace) -> None:
    from pyrovae.compare import run_compare

    run_compare(args)


COMMANDS = {"fit": _fit, "evaluate": _evaluate, "score": _score, "unlearn": _unlearn, "sample": _sample, "compare": _compare}


# Torch CPU threads when --threads is not given. pyrovae's models are small: one thread runs
# them as fast as two on a quiet machine (benchmarks/throughput.py), and a budgeted `compare`
# on a busy one took 168 steps with torch's default pool against 6,469 with one thread,
# reordering the table. One thread gives the same answer however busy the machine is.
DEFAULT_THREADS = 1


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's CPU thread count for one command (`--threads`, else `DEFAULT_THREADS`), put back after."""
    if threads is not None and threads < 1:
        raise PyrovaeError(f"--threads must be positive, got {threads}")
    import torch

    # the pool is touched only to change it: resizing it in a forked child can hang
    before, wanted = torch.get_num_threads(), threads or DEFAULT_THREADS
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "list":  # no torch: the catalog is all it reads
            _list(args)
        else:
            with torch_threads(args.threads):
                code = COMMANDS[args.command](args)
            if code:
                return int(code)
    except PyrovaeError as error:
        print(f"pyrovae: error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and not any(s in str(error) for s in ("can't allocate memory", "out of memory")):
            raise
        print(f"pyrovae: error: out of memory ({first_line(error, 160)}): choose a smaller --latent, --hidden or --batch-size", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`pyrovae list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("pyrovae: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    return 0
