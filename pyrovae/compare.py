"""Fair comparison of inference methods: `compare` trains every method on the same data,
decoder and budget, scores every decoder on held-out data with the same annealed importance
sampling (`pyrovae.ais`, Wu et al. 2017), with the BDMC sandwich on simulated data saying how
tight it is, keeps importance sampling with a proposal fitted per example and with the
method's own encoder beside it (`pyrovae.heldout`), and tabulates the results (Kingma &
Welling 2019, appendix A.2 for the methods); `run_gaps` decomposes a run's inference gaps.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from pyrovae.ais import AISSettings, ais, bdmc, unannealable
from pyrovae.batch import as_batch
from pyrovae.data import minibatches
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.experiment import Config, build, load
from pyrovae.files import atomic_write, check_writable, locked, save_printed
from pyrovae.heldout import ProposalSettings, gap_decomposition, heldout_scores
from pyrovae.registry import METHODS

__all__ = ["ProposalSettings", "compare", "gap_decomposition", "heldout_scores", "parse_method", "run_compare", "run_gaps"]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"wake-sleep:variant=rws:particles=5"`` -> ("wake-sleep", {"variant": "rws", "particles": 5})."""
    name, *items = spec.split(":")
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise PyrovaeError(f"method option {item!r} in {spec!r} is not KEY=VALUE")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.replace("-", "_")] = value
    METHODS.get(name)
    return name, options


def _warm_up(method: Any, experiment: Any) -> None:
    """One untimed step, then the state restored: one-off costs (lazy kernels, first traces) are
    not charged to whichever method happens to run first."""
    index = torch.arange(min(method.settings.batch_size, len(experiment.data.split("train"))))
    x = experiment.data.batch("train", index).to(experiment.device)
    method.prepare(x)
    state = copy.deepcopy(method.state_dict())
    method.step(x, index.to(experiment.device))
    method.load_state_dict(state)


def _train_for(method: Any, experiment: Any, budget: float | None, steps: int | None, checkpoints: int, checkpoint_eval: Callable[[], float], seed: int,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `method.step` until the budget (training seconds, evaluations excluded) or steps run
    out; each point of the anytime curve is logged as it is scored."""
    data, n = experiment.data, len(experiment.data.split("train"))
    _warm_up(method, experiment)
    generator = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    marks = [(i + 1) / checkpoints for i in range(checkpoints)]
    limit = budget if budget is not None else float(steps)
    seconds, done, losses, curve = 0.0, 0, [], [{"seconds": 0.0, "steps": 0, "heldout_ll": checkpoint_eval()}]
    while marks:
        for index in minibatches(n, method.settings.batch_size, generator):
            start = time.perf_counter()
            x = data.batch("train", index, generator).to(experiment.device)
            loss = float(method.step(x, index.to(experiment.device)))  # waits for the step: the clock is honest on a GPU
            seconds, done = seconds + time.perf_counter() - start, done + 1
            if not math.isfinite(loss):
                raise PyrovaeError(f"{method.name}: the loss became {loss} at step {done}")
            losses.append(loss)
            progress = (seconds if budget is not None else done) / limit
            while marks and progress >= marks[0]:
                marks.pop(0)
                curve.append({"seconds": seconds, "steps": done, "heldout_ll": checkpoint_eval()})
                log(f"  {method.name}: {100 * (1 - len(marks) / checkpoints):3.0f}%  step {done}  {seconds:.1f} s  "
                    f"loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  held-out log p(x) {curve[-1]['heldout_ll']:.3f}")
            if not marks:
                break
    tail = losses[-max(1, len(losses) // 10):]
    return {"seconds": seconds, "steps": done, "final_loss": sum(tail) / len(tail), "curve": curve}


def compare(
    model_name: str,
    dataset: str,
    methods: Sequence[str],
    budget_seconds: float | None = None,
    steps: int | None = None,
    out_dir: str | Path = "compare",
    *,
    latent: int = 10,
    hidden: Sequence[int] = (200,),
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoints: int = 4,
    eval_examples: int = 200,
    checkpoint_examples: int = 64,
    proposal: ProposalSettings = ProposalSettings(),
    annealing: AISSettings | None = AISSettings(steps=200, chains=8, leapfrog=5, warmup=50),
    bdmc_examples: int = 32,
    dataset_options: dict[str, Any] | None = None,
    data_dir: str | None = None,
    log: Callable[[str], None] = print,
    guide: str = "diagonal",
    objective: str = "elbo",
    fields: str = "x",
    plate: str | None = None,
    model_options: dict[str, Any] | None = None,
    guide_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train each method in `methods` with the same budget, data and decoder; write the table.

    Every decoder is scored by AIS with `annealing` (None: IS only), on `eval_examples` held-out
    examples at the end and on `checkpoint_examples` of them at each checkpoint (the anytime
    curve: the same estimator at every point), and by BDMC on `bdmc_examples` simulated ones.
    Writes compare.md, compare.csv, compare.json and compare.png (the anytime curves) into `out_dir`.
    A method spec may carry options: ``"wake-sleep:variant=rws"``. `model_name` and `guide`
    may be a user's program (``path/to/script.py:NAME``); the amortized arms train that guide.
    Each arm runs in its own scope of Pyro's param store, so that programs using `pyro.param`
    start every arm from the same initial values and never share trained ones.
    """
    if (budget_seconds is None) == (steps is None):
        raise PyrovaeError("give exactly one of a budget in seconds or a number of steps")
    _positive(budget_seconds=budget_seconds, steps=steps, checkpoints=checkpoints, eval_examples=eval_examples,
              checkpoint_examples=checkpoint_examples, batch_size=batch_size, latent=latent, lr=lr, samples=proposal.samples)
    if proposal.steps < 0:
        raise PyrovaeError(f"--proposal-steps must be >= 0, got {proposal.steps}")
    if annealing is not None:
        annealing.check()
    if bdmc_examples < 0:
        raise PyrovaeError(f"--bdmc must be >= 0, got {bdmc_examples}")
    specs = [parse_method(m) for m in methods]
    if not specs:
        raise PyrovaeError("--methods names no method: give e.g. amortized,local")
    config = Config(model=model_name, guide=guide, method="amortized", objective=objective, dataset=dataset, dataset_options=dataset_options or {},
                    data_dir=data_dir, latent=latent, hidden=tuple(hidden), batch_size=batch_size, lr=lr, seed=seed, epochs=0, fields=fields,
                    plate=plate, model_options=model_options or {}, guide_options=guide_options or {})
    config.check()
    out = Path(out_dir)
    check_writable(out)
    budget = _Budget(budget_seconds, steps, checkpoints, eval_examples, checkpoint_examples, proposal, annealing, bdmc_examples)
    setup = {"model": model_name, "guide": guide, "objective": objective, "dataset": dataset, "fields": fields, "budget_seconds": budget_seconds,
             "steps": steps, "latent": latent, "hidden": list(hidden), "batch_size": batch_size, "lr": lr, "seed": seed,
             "ais": None if annealing is None else dataclasses.asdict(annealing), "bdmc_examples": bdmc_examples,
             "checkpoint_examples": min(checkpoint_examples, eval_examples)}
    _preflight(specs, config)
    rows = []
    with locked(out):
        for number, (spec, (name, options)) in enumerate(zip(methods, specs), 1):
            log(f"[{number}/{len(specs)}] {spec}")
            with pyro.get_param_store().scope():
                rows.append(_arm(spec, name, options, config, budget, log))
        write_table(rows, out, setup)
    return rows


@dataclass(frozen=True)
class _Budget:
    """What every arm of `compare` gets: its training budget and its scoring."""

    seconds: float | None
    steps: int | None
    checkpoints: int
    eval_examples: int
    checkpoint_examples: int
    proposal: ProposalSettings
    annealing: AISSettings | None
    bdmc_examples: int


def _positive(**values: float | None) -> None:
    """Refuse, in one line, a budget, count or size that is not a positive finite number."""
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            flag = {"budget_seconds": "budget"}.get(name, name).replace("_", "-")
            raise PyrovaeError(f"--{flag} must be positive, got {value}")


def _preflight(specs: list[tuple[str, dict[str, Any]]], config: Config) -> None:
    """Build every method and show it the model's sites before any trains: one that cannot infer
    them (a discrete site for local, map, mcmc-em) refuses in one line, with nothing trained or written."""
    experiment = build(config)
    sites = experiment.method.sites
    for name, options in specs:
        method = METHODS.get(name)(experiment.model, experiment.guide, experiment.method.settings, len(experiment.data.split("train")),
                                   sites=sites, **options)
        if sites is not None:
            method.check_sites(sites)


def _arm(spec: str, name: str, options: dict[str, Any], config: Config, budget: _Budget, log: Callable[[str], None]) -> dict[str, Any]:
    """One method of `compare`: built, trained for the budget and scored (see there)."""
    proposal = budget.proposal
    experiment = build(config)  # same seed: every method starts from the same decoder
    method = METHODS.get(name)(experiment.model, experiment.guide, experiment.method.settings, len(experiment.data.split("train")),
                               sites=experiment.method.sites, **options)
    split = "valid" if "valid" in experiment.data.splits else "test"
    heldout = as_batch(experiment.split(split))[: budget.eval_examples]
    sites = experiment.method.sites
    quick = ProposalSettings(max(10, proposal.steps // 3), proposal.lr, max(10, proposal.samples // 2), proposal.covariance)
    # a Gaussian fitted per example serves continuous latents; discrete ones are scored by the
    # method's own guide only (a method without a guide refused such a model already)
    fittable = not sites.unservable()
    refused = unannealable(sites) if budget.annealing is not None else None
    annealing = budget.annealing if refused is None else None

    def scored(fn: Callable[[], Any]) -> Any:
        experiment.train_mode(False)
        try:
            return fn()
        finally:
            experiment.train_mode(True)

    def checkpoint_eval() -> float:
        part = heldout[: budget.checkpoint_examples]
        if annealing is not None:
            return scored(lambda: ais(experiment.model, part, settings=annealing, plate=sites.plate)).log_likelihood.mean().item()
        if not fittable:
            return scored(lambda: evaluate(experiment.model, experiment.guide, part, num_samples=quick.samples, plate=sites.plate)).log_likelihood.mean().item()
        return heldout_scores(experiment.model, part, sites, quick).log_likelihood.mean().item()

    log(f"  {spec}: training{'' if annealing is None else ', the anytime curve scored by AIS on ' + str(len(heldout[: budget.checkpoint_examples])) + ' examples'}")
    result = _train_for(method, experiment, budget.seconds, budget.steps, budget.checkpoints, checkpoint_eval, config.seed, log)
    row: dict[str, Any] = {
        "method": spec, "gives_elbo": bool(method.gives_elbo),
        "train_bound": -result["final_loss"] if method.gives_elbo else None,
        "train_log_joint": -result["final_loss"] if not method.gives_elbo else None,
        "heldout_ll_ais": None, "ais_stderr": None, "ais_accept": None, "bdmc_lower": None, "bdmc_upper": None, "bdmc_width": None,
        "heldout_ll": None, "heldout_elbo_fitted": None, "heldout_ll_amortized": None, "heldout_elbo_amortized": None,
        "train_seconds": result["seconds"], "steps": result["steps"],
        "steps_per_second": result["steps"] / max(result["seconds"], 1e-9),
        "examples_per_second": result["steps"] * config.batch_size / max(result["seconds"], 1e-9),
        "split": split, "heldout_examples": len(heldout), "proposal_steps": proposal.steps, "is_samples": proposal.samples,
        "ais": None if annealing is None else dataclasses.asdict(annealing), "ais_refused": refused,
    }
    start = time.perf_counter()
    if annealing is not None:
        annealed = scored(lambda: ais(experiment.model, heldout, settings=annealing, plate=sites.plate)).summary()
        row.update(heldout_ll_ais=annealed["log_likelihood"], ais_stderr=annealed["stderr"], ais_accept=annealed["accept_rate"])
    row["ais_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    if annealing is not None and budget.bdmc_examples:
        sandwich = scored(lambda: bdmc(experiment.model, heldout[: budget.bdmc_examples], settings=annealing, plate=sites.plate)).summary()
        row.update(bdmc_lower=sandwich["lower"], bdmc_upper=sandwich["upper"], bdmc_width=sandwich["width"])
    row["bdmc_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    if fittable:
        fitted = heldout_scores(experiment.model, heldout, sites, proposal)
        row.update(heldout_ll=fitted.log_likelihood.mean().item(), heldout_elbo_fitted=fitted.elbo.mean().item())
    if method.trains_guide:
        amortized = scored(lambda: evaluate(experiment.model, experiment.guide, heldout, num_samples=proposal.samples, plate=sites.plate))
        row.update(heldout_ll_amortized=amortized.log_likelihood.mean().item(), heldout_elbo_amortized=amortized.elbo.mean().item())
    row["is_seconds"] = time.perf_counter() - start
    row["eval_seconds"] = row["ais_seconds"] + row["bdmc_seconds"] + row["is_seconds"]
    row["curve"] = result["curve"]
    score, how = next(((row[k], how) for k, how in (("heldout_ll_ais", "AIS"), ("heldout_ll", "IS, fitted proposals"), ("heldout_ll_amortized", "IS, its own guide")) if row[k] is not None), (None, ""))
    log(f"{spec}: held-out log p(x) {_cell(score)} ({how}) after {row['steps']} steps, {row['train_seconds']:.1f} s")
    return row


COLUMNS = ("method", "train_bound", "train_log_joint", "heldout_ll_ais", "ais_stderr", "bdmc_width", "heldout_ll", "heldout_elbo_fitted",
           "heldout_ll_amortized", "heldout_elbo_amortized", "train_seconds", "eval_seconds", "steps", "steps_per_second", "examples_per_second")


# compare.md: what a reader compares, titled with units; compare.csv and compare.json hold every column
TABLE = (("method", "method"), ("heldout_ll_ais", "AIS log p(x)"), ("ais_stderr", "±"), ("bdmc_width", "BDMC width"),
         ("heldout_ll", "IS, fitted q"), ("heldout_ll_amortized", "IS, own q"), ("train_bound", "train bound"),
         ("steps", "steps"), ("train_seconds", "train s"), ("eval_seconds", "eval s"))


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def write_table(rows: list[dict[str, Any]], out: Path, setup: dict[str, Any]) -> None:
    """compare.md, compare.csv, compare.json and compare.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else {"is_samples": 0, "heldout_examples": 0, "split": "", "proposal_steps": 0, "ais": None}
    ais_settings = first["ais"]
    note = f"Held-out: {first['heldout_examples']} {first['split']} examples. "
    if ais_settings:
        note += (f"AIS log p(x): AIS from the prior, T={ais_settings['steps']} sigmoid-spaced temperatures, {ais_settings['chains']} chains, "
                 f"one HMC transition of {ais_settings['leapfrog']} leapfrog steps each (step sizes adapted per example in a {ais_settings['warmup']}-step "
                 "warm-up, then frozen): the same estimator for every decoder, a stochastic lower bound on log p(x); ± its Monte Carlo error. "
                 "BDMC width: upper minus lower BDMC bound on data simulated from the trained model (Grosse et al. 2015). ")
    note += (f"IS, fitted q: IS with {first['is_samples']} samples from a diagonal Gaussian fitted per example ({first['proposal_steps']} Adam steps, "
             "decoder frozen); IS, own q: with the method's own encoder. train bound: minus the training loss (ELBO or IWAE-K); "
             "train_log_joint (in compare.csv): log p(x, z) at the method's z (MAP, MCMC-EM), not a bound. eval s: all held-out scoring, "
             "apart from train s. Log-likelihoods and bounds in nats per example; every column in compare.csv and compare.json.")
    refused = {r["ais_refused"] for r in rows if r.get("ais_refused")}
    if refused:
        note += " Empty AIS columns: " + "; ".join(sorted(refused)) + "."
    if any(r["heldout_ll"] is None for r in rows):
        note += " Empty fitted columns: the model has discrete latents, which a fitted Gaussian cannot serve; its own guide scores it."
    md = ["| " + " | ".join(title for _, title in TABLE) + " |", "|" + "---|" * len(TABLE)]
    md += ["| " + " | ".join(_cell(r[key]) for key, _ in TABLE) + " |" for r in rows]
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text("\n".join(md) + "\n\n" + note + "\n"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "compare.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    text = json.dumps({"setup": setup, "note": note, "results": rows}, indent=2) + "\n"
    atomic_write(out / "compare.json", lambda tmp: Path(tmp).write_text(text))
    fig, ax = plt.subplots(figsize=(6, 4))
    key, how = ("heldout_ll_ais", "AIS") if rows and rows[0]["heldout_ll_ais"] is not None else ("heldout_ll", "IS, fitted q")
    for r in rows:
        line, = ax.plot([c["seconds"] for c in r["curve"]], [c["heldout_ll"] for c in r["curve"]], marker="o", label=r["method"])
        if r[key] is not None:  # the table's figure, on all its held-out examples
            ax.plot([r["train_seconds"]], [r[key]], marker="*", markersize=12, color=line.get_color(), linestyle="none")
    curve_examples = setup.get("checkpoint_examples", first["heldout_examples"])
    ax.set_title(f"curves: {how} on {curve_examples} held-out examples; stars: the table, {how} on {first['heldout_examples']}", fontsize=9)
    ax.set_xlabel("training seconds"), ax.set_ylabel(f"held-out log p(x) ({how}), nats/example"), ax.grid(alpha=0.3), ax.legend()
    atomic_write(out / "compare.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def run_gaps(run: str | Path, split: str = "valid", examples: int = 200, settings: ProposalSettings = ProposalSettings(steps=200, samples=1000)) -> dict[str, Any]:
    """The gap decomposition of a trained run's amortized guide (`pyrovae.heldout.gap_decomposition`)."""
    experiment = load(run)
    experiment.train_mode(False)
    x = as_batch(experiment.split(split))[:examples]
    gaussian = {"diagonal": "diagonal", "full": "full"}.get(experiment.config.guide)
    qstar = "local" if gaussian else "finetune"
    proposal = ProposalSettings(settings.steps, settings.lr, settings.samples, gaussian or "diagonal", settings.particles)
    result = {"run": str(run), "split": split, "guide": experiment.config.guide, **gap_decomposition(experiment.model, experiment.guide, x, proposal, qstar)}
    return result


def gaps_table(result: dict[str, Any]) -> str:
    """`run_gaps`'s result for people: the bounds, the gaps with their standard errors, and
    what a negative gap means."""
    rows = [
        ("log p(x), the larger IS estimate", f"{result['log_px']:.3f}"),
        (f"ELBO of q*, {result['qstar']} fitted per example", f"{result['elbo_qstar']:.3f}"),
        (f"ELBO of q, the amortized {result['guide']} guide", f"{result['elbo_q']:.3f}"),
        ("approximation gap  log p(x) - L[q*]", f"{result['approximation_gap']:.3f} ± {result['approximation_gap_se']:.3f}"),
        ("amortization gap   L[q*] - L[q]", f"{result['amortization_gap']:.3f} ± {result['amortization_gap_se']:.3f}"),
        ("total gap          log p(x) - L[q]", f"{result['total_gap']:.3f} ± {result['total_gap_se']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{result['run']}: {result['examples']} {result['split']} examples, nats per example (± one standard error)"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    if result["amortization_gap"] < 0:
        lines.append("  a negative amortization gap: the per-example fit of q* ended below the amortized guide, so q* is not yet the best "
                     "of its family; the gaps are not reliable: raise --proposal-steps")
    if result["approximation_gap"] < 0:
        lines.append("  a negative approximation gap: the IS estimate of log p(x) is below a lower bound on it, so it is too noisy: raise --samples")
    return "\n".join(lines)


def run_compare(args: argparse.Namespace) -> None:
    """Run ``pyrovae compare`` from parsed arguments."""
    if args.gaps:
        result = run_gaps(args.gaps, args.split, args.eval_examples, ProposalSettings(steps=args.proposal_steps, samples=args.samples))
        print(json.dumps(result, indent=2) if args.json else gaps_table(result))
        save_printed(Path(args.gaps) / "gaps.json", result)
        return
    if args.budget is None and args.steps is None:
        raise PyrovaeError("give --budget SECONDS or --steps N")
    rows = compare(
        args.model, args.dataset, [m for m in args.methods.split(",") if m], args.budget, args.steps, args.out,
        latent=args.latent, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoints=args.checkpoints,
        eval_examples=args.eval_examples, proposal=ProposalSettings(steps=args.proposal_steps, samples=args.samples), data_dir=args.data_dir,
        annealing=AISSettings(steps=args.ais_steps, chains=args.chains, leapfrog=args.leapfrog, warmup=min(50, args.ais_steps)) if args.ais_steps else None,
        bdmc_examples=args.bdmc,
        log=(lambda s: None) if args.json else print, guide=args.guide, objective=args.objective, fields=args.fields, plate=args.plate,
        dataset_options=dict(args.data_option or []), model_options=dict(args.model_option or []), guide_options=dict(args.guide_option or []),
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print((Path(args.out) / "compare.md").read_text())
