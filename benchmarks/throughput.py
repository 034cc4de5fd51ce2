"""Training and evaluation throughput: pyrovae against hand-written PyTorch, pythae and plain Pyro.

The Burda et al. (2016) MLP VAE (784-200-200-50 tanh) on static binarized MNIST, and the same
decoder with the IAF guide. Each implementation takes training steps on the same minibatch
indices; runs interleave (A B C ... A B C ...) in one process, and the medians over rounds are
reported with their ratio to hand-written PyTorch. Evaluation: the importance-sampled log p(x)
with K = 5000 through pyrovae's `evaluate` and through a hand-written vectorized estimator on
the very same networks, also interleaved.

    python benchmarks/throughput.py                  # writes benchmarks/results/throughput.{json,md}
    python benchmarks/throughput.py --device cuda    # ... throughput_cuda.{json,md}, on the GPU

On a GPU the data set is held on the device and every implementation gathers its minibatches
there; the clock stops only after the device has finished (`torch.cuda.synchronize`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from torch.nn.functional import softplus

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from common import SHARED_DATA, machine, write_results  # noqa: E402

from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.evaluate import default_max_elements, evaluate  # noqa: E402
from pyrovae.experiment import _peak_memory_mb  # noqa: E402
from pyrovae.guides import build_guide  # noqa: E402
from pyrovae.infer import AmortizedVI, TrainSettings  # noqa: E402
from pyrovae.models import VAE  # noqa: E402

Step = Callable[[torch.Tensor], None]


def burda_vae(data, guide: str) -> tuple[VAE, torch.nn.Module]:
    """The Burda et al. MLP VAE (784-200-200-50 tanh) and a pyrovae guide for it, on the data's device."""
    model = VAE((784,), 50, (200, 200), "tanh").to(data.device)
    return model, build_guide(guide, model, data.batch("train", torch.arange(8))).to(data.device)


def pyrovae_step(data, guide: str, objective: str, batch: int) -> Step:
    model, q = burda_vae(data, guide)
    method = AmortizedVI(model, q, TrainSettings(objective, 1, 1e-3, batch), len(data.split("train")))
    step = lambda index: method.step(data.batch("train", index), index)  # noqa: E731
    index = torch.arange(batch, device=data.device)
    for _ in range(CHECKED_UNTIL):  # past the early checks against the program (calls 1, 10, 100), whose cost the README states
        step(index)
    return step


CHECKED_UNTIL = 100


def plain_pyro_step(data, guide: str) -> Step:
    """Pyro's own VAE example loop: SVI(Trace_ELBO) with pyro.optim.Adam on the same modules."""
    model, q = burda_vae(data, guide)
    svi = pyro.infer.SVI(model, q, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    return lambda index: svi.step(data.batch("train", index))


def pytorch_step(data, fused: bool, scale: str = "softplus", kl: str = "analytic") -> Step:
    """The identical networks and loss by hand: pyrovae's diagonal guide gives sigma = softplus(raw) + 1e-4.

    `kl="analytic"` is the closed-form KL (pyrovae's elbo-analytic); `kl="sampled"` estimates it
    as log q(z|x) - log p(z) at the sample, as pyrovae's elbo (Trace_ELBO) does.
    """
    model = peers.handwritten_vae(scale=scale).to(data.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    objective = model.elbo if kl == "analytic" else model.sampled_elbo

    def step(index: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = -objective(data.batch("train", index)).mean()
        loss.backward()
        optimizer.step()

    return step


def pytorch_iaf_step(data) -> Step:
    """pyrovae's IAF guide and VAE decoder modules, the flow and its ELBO written out by hand.

    The same networks (the guide's trunk and head, Pyro's ConditionalAutoRegressiveNN per step,
    the decoder MLP) and the same Monte Carlo ELBO, without Pyro's distributions or tracing:
    z0 = mu + sigma eps; per step z <- m + exp(l) z with l clipped to [-5, 3] as Pyro clips it
    (or, for `stable=True` guides, z <- s z + (1 - s) m with s = sigmoid(logit + 2)), the order
    reversed between steps; log q = log N(z0) - sum of the steps' log-scales.
    """
    model, guide = burda_vae(data, "iaf")
    head = guide.heads["z"]
    optimizer = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=1e-3, fused=True)
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def elbo(xb: torch.Tensor) -> torch.Tensor:
        out = head.encoder(guide.trunk(xb))
        loc, raw, context = out.split([50, 50, out.shape[-1] - 100], dim=-1)
        scale = softplus(raw) + guide.min_scale
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_q = (-0.5 * eps.pow(2) - scale.log() - half_log_2pi).sum(-1)
        for step in head.steps:
            if isinstance(step, ConditionalAffineAutoregressive) and step.kwargs.get("stable"):
                mean, logit = step.nn(z, context=context)
                logit = logit + step.kwargs.get("sigmoid_bias", 2.0)
                s = torch.sigmoid(logit)
                z = s * z + (1 - s) * mean
                log_q = log_q - torch.nn.functional.logsigmoid(logit).sum(-1)
            elif isinstance(step, ConditionalAffineAutoregressive):
                mean, log_scale = step.nn(z, context=context)
                log_scale = log_scale + (log_scale.clamp(-5.0, 3.0) - log_scale).detach()
                z = torch.exp(log_scale) * z + mean
                log_q = log_q - log_scale.sum(-1)
            else:  # pyrovae.guides.flows.Reverse
                z = z.flip(-1)
        log_p = (-0.5 * z.pow(2) - half_log_2pi).sum(-1)
        rec = -torch.nn.functional.binary_cross_entropy_with_logits(model.decoder(z), xb, reduction="none").sum(-1)
        return rec + log_p - log_q

    def step(index: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        (-elbo(data.batch("train", index)).mean()).backward()
        optimizer.step()

    step.elbo, step.model, step.guide = elbo, model, guide  # for checking it against pyrovae's loss
    return step


def pythae_step(data, iaf: bool = False) -> Step:
    """pythae's VAE on the same MLPs; with `iaf`, its VAE_IAF: two MADE blocks of two 500-unit
    layers, as pyrovae's iaf (flow_steps=2, MADE [500, 500]), but unconditional (pyrovae's IAF
    steps also take a context h from the encoder)."""
    from pythae.models import VAE, VAE_IAF, VAE_IAF_Config, VAEConfig

    encoder, decoder = peers._pythae_modules()
    common = dict(input_dim=(1, 28, 28), latent_dim=50, reconstruction_loss="bce")
    if iaf:
        model = VAE_IAF(VAE_IAF_Config(**common, n_made_blocks=2, n_hidden_in_made=2, hidden_size=500), encoder, decoder)
    else:
        model = VAE(VAEConfig(**common), encoder, decoder)
    model = model.to(data.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(index: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        model({"data": data.batch("train", index).reshape(-1, 1, 28, 28)}).loss.backward()
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(steps: dict[str, Step], batches: list[torch.Tensor], rounds: int) -> dict[str, float]:
    """Median images/second of each step function over `rounds` interleaved passes."""
    device = batches[0].device
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        for index in batches[:3]:
            step(index)
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for index in batches:
                step(index)
            synchronize(device)
            rates[name].append(sum(len(b) for b in batches) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def working_steps(builders: dict[str, Callable[[], Step]], index: torch.Tensor, failures: dict[str, str]) -> dict[str, Step]:
    """Build each implementation and take one step; one that fails is reported in `failures` and left out."""
    steps = {}
    for name, build in builders.items():
        try:
            step = build()
            step(index)
            steps[name] = step
        except Exception as error:  # a peer library that cannot run here must not sink the other rows
            failures[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"left out {name}: {failures[name]}", flush=True)
    return steps


def training(data, args, failures: dict[str, str]) -> list[dict]:
    rows = []
    n = len(data.split("train"))
    for batch in (100, 1000):
        generator = torch.Generator().manual_seed(batch)
        count = max(3, args.images // batch)
        batches = [torch.randint(0, n, (batch,), generator=generator).to(data.device) for _ in range(count)]
        builders = {
            "pytorch, analytic KL": lambda: pytorch_step(data, True),
            "pyrovae elbo-analytic": lambda: pyrovae_step(data, "diagonal", "elbo-analytic", batch),
            "pytorch, sampled KL": lambda: pytorch_step(data, True, kl="sampled"),
            "pyrovae elbo": lambda: pyrovae_step(data, "diagonal", "elbo", batch),
            "pytorch, analytic KL, default Adam": lambda: pytorch_step(data, False),
            "pytorch, analytic KL, log-variance encoder": lambda: pytorch_step(data, True, "logvar"),
            "plain Pyro SVI": lambda: plain_pyro_step(data, "diagonal"),
            "pytorch iaf": lambda: pytorch_iaf_step(data),
            "pyrovae iaf": lambda: pyrovae_step(data, "iaf", "elbo", batch),
            "plain Pyro SVI iaf": lambda: plain_pyro_step(data, "iaf"),
        }
        if not args.no_pythae:
            builders["pythae"] = lambda: pythae_step(data)
            builders["pythae VAE_IAF"] = lambda: pythae_step(data, iaf=True)
        steps = working_steps(builders, batches[0], failures)
        rates = interleave(steps, batches, args.rounds)
        for name, rate in rates.items():
            peer = PEERS.get(name, "pytorch, analytic KL")
            if peer not in rates:
                continue
            rows.append({"part": "train", "batch": batch, "implementation": name, "images_per_second": rate,
                         "peer": peer, "ratio": rate / rates[peer]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# the hand-written loop computing the same loss: each row's ratio is to its peer
PEERS = {"pyrovae elbo": "pytorch, sampled KL", "pytorch, sampled KL": "pytorch, sampled KL", "plain Pyro SVI": "pytorch, sampled KL",
         "pytorch iaf": "pytorch iaf", "pyrovae iaf": "pytorch iaf", "plain Pyro SVI iaf": "pytorch iaf", "pythae VAE_IAF": "pytorch iaf"}


def evaluation(data, args) -> list[dict]:
    """pyrovae's evaluate against a hand-written vectorized estimator on the same networks."""
    model, guide = burda_vae(data, "diagonal")
    head = guide.heads["z"]

    def encode(x):
        loc, raw = head(guide.trunk(x)).chunk(2, -1)
        return loc, softplus(raw) + guide.min_scale

    x = data.batch("valid", torch.arange(args.eval_images))
    # the hand-written estimator holds as many floats at once as pyrovae's evaluate does by default
    max_elements = default_max_elements(data.device)
    runs = {
        "pyrovae evaluate": lambda: evaluate(model, guide, list(x.split(500)), num_samples=args.samples),
        "pytorch estimator": lambda: peers.importance_sampled_log_likelihood(encode, model.decoder, x, num_samples=args.samples, max_elements=max_elements),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(args.eval_rounds):
            for name, run in runs.items():
                synchronize(data.device)
                start = time.perf_counter()
                run()
                synchronize(data.device)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["pytorch estimator"])
    rows = []
    for name, t in times.items():
        seconds = statistics.median(t)
        rows.append({"part": "eval", "implementation": name, "images": len(x), "samples": args.samples,
                     "seconds": seconds, "seconds_per_10k_images": seconds * 10000 / len(x), "ratio": base / seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def peak_memory_of_evaluation(args, gpu: bool = False) -> float:
    """Peak resident MB of a fresh process that evaluates IS-K on `eval_images` images; with
    `gpu`, the peak GPU memory torch allocated in it instead."""
    report = "print(torch.cuda.max_memory_allocated() / 2**20)" if gpu else "from pyrovae.experiment import _peak_memory_mb; print(_peak_memory_mb())"
    code = (
        "import torch; from pyrovae.models import VAE; from pyrovae.guides import build_guide; "
        "from pyrovae.evaluate import evaluate; from pyrovae.data import load_dataset; "
        f"torch.set_num_threads({args.threads}); d = load_dataset('binarized-mnist', {args.data_dir!r}); "
        f"x = d.batch('valid', torch.arange({args.eval_images}), device={args.device!r}); m = VAE((784,), 50).to(x.device); "
        f"g = build_guide('diagonal', m, x).to(x.device); evaluate(m, g, list(x.split(500)), num_samples={args.samples}); {report}"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def peak_memory_of_fit(args) -> float:
    """Peak resident MB of `pyrovae fit` on binarized MNIST, as the run's metrics.json reports it."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "pyrovae", "fit", "--dataset", "binarized-mnist", "--data-dir", args.data_dir, "--epochs", "1",
                        "--device", args.device, "--eval-samples", "0", "--quiet", "--threads", str(args.threads), "--out", f"{out}/run"], check=True, capture_output=True)
        return json.loads(Path(f"{out}/run/metrics.json").read_text())["peak_memory_mb"]


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}. Medians of {result['rounds']} interleaved rounds of {result['images']} images. "
             "Each row's ratio is to the hand-written loop of the same loss (fused Adam, identical networks).", "",
             "| training | batch | images/s | ratio | to |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["part"] == "train":
            to = "" if r["peer"] == r["implementation"] else r["peer"]
            lines.append(f"| {r['implementation']} | {r['batch']} | {r['images_per_second']:.0f} | {r['ratio']:.2f}x | {to} |")
    lines += ["", f"| evaluation, IS-{result['samples']} | images | seconds | per 10k images | vs PyTorch |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["part"] == "eval":
            lines.append(f"| {r['implementation']} | {r['images']} | {r['seconds']:.1f} | {r['seconds_per_10k_images']:.0f} s | {r['ratio']:.2f}x |")
    lines.append("")
    lines.append(f"Peak resident memory of a process evaluating IS-{result['samples']} (chunked): {result['eval_peak_memory_mb']:.0f} MB; "
                 f"of `pyrovae fit` on binarized MNIST (50,000 images held as uint8, 1 epoch): {result['fit_peak_memory_mb']:.0f} MB.")
    if "eval_peak_gpu_memory_mb" in result:
        lines.append(f"Peak GPU memory allocated while evaluating: {result['eval_peak_gpu_memory_mb']:.0f} MB.")
    for name, why in result.get("left_out", {}).items():
        lines.append(f"Left out: {name} ({why}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=SHARED_DATA)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=5000, help="images per implementation per round")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--eval-rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--no-pythae", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where every implementation runs")
    parser.add_argument("--out", help="results name (default: throughput, or throughput_cuda on a GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    device = torch.device(args.device)
    data = load_dataset("binarized-mnist", args.data_dir).to(device)
    failures: dict[str, str] = {}
    rows = training(data, args, failures) + evaluation(data, args)
    result = {"benchmark": "throughput", "machine": machine(device), "device": str(device), "rounds": args.rounds, "images": args.images,
              "samples": args.samples, "eval_images": args.eval_images,
              "eval_peak_memory_mb": peak_memory_of_evaluation(args), "fit_peak_memory_mb": peak_memory_of_fit(args), "rows": rows,
              "process_peak_memory_mb": _peak_memory_mb(), "left_out": failures}
    if device.type == "cuda":
        result["eval_peak_gpu_memory_mb"] = peak_memory_of_evaluation(args, gpu=True)
    write_results(args.out or ("throughput" if device.type == "cpu" else f"throughput_{device.type}"), result, markdown(result))


if __name__ == "__main__":
    main()
