"""Adversarial hybrids on static binarized MNIST: pyrovae's adversarial autoencoder and VAE-GAN
beside pythae's `Adversarial_AE` and `VAEGAN` at one architecture and budget, scored by one
importance-sampled log p(x) (with each model's Gaussian encoder as the proposal) and by the
Fréchet distance, precision and recall of 5,000 samples against 5,000 validation images on the
features of a project-trained MLP classifier (`pyrovae.sample_quality`; not FID).

    python benchmarks/adversarial.py --epochs 10

(needs pythae: see benchmarks/requirements.txt)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import tempfile
import time
from typing import Any
from unittest import mock

import peers
import torch
from common import SHARED_DATA, machine, write_results

from pyrovae.data import load_dataset
from pyrovae.experiment import Config, fit
from pyrovae.sample_quality import feature_network, frechet_distance, precision_recall
from pyrovae.sampling import draw

LATENT, HIDDEN, CRITIC_HIDDEN = 10, (200, 200), 256
ANCHOR = ("no published log-likelihood or FD of these exact models on binarized MNIST: Makhzani et al. (2016) report a Parzen-window "
          "log-likelihood of 340 +- 2 on MNIST's test set (a different estimator, on real-valued pixels) and Larsen et al. (2016) report CelebA images, not likelihoods")


def pyrovae_row(name: str, method: str, options: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    config = Config(dataset="binarized-mnist", data_dir=args.data_dir, method=method, latent=LATENT, hidden=HIDDEN, activation="tanh",
                    batch_size=100, lr=args.lr, epochs=args.epochs, eval_samples=0, seed=args.seed,
                    method_options={"hidden": CRITIC_HIDDEN, "layers": 1, "critic_lr": args.critic_lr, **options})
    experiment, metrics = fit(config, progress=False)
    experiment.train_mode(False)
    start = time.perf_counter()
    scored = experiment.evaluate("valid", num_samples=args.samples, examples=args.examples)
    row = {"name": name, "elbo": scored.elbo.mean().item(), "log_likelihood": scored.log_likelihood.mean().item(),
           "train_seconds": metrics["train_seconds"], "examples_per_second": metrics["examples_per_second"], "eval_seconds": time.perf_counter() - start}
    valid = experiment.split("valid")[:1]

    def sample(n: int) -> torch.Tensor:
        return torch.cat([draw(experiment.model, valid, min(1000, n - i)) for i in range(0, n, 1000)])

    return row, sample


def pythae_row(name: str, kind: str, args: argparse.Namespace, train_x: torch.Tensor, valid_x: torch.Tensor) -> tuple[dict[str, Any], Any]:
    # pythae is an optional peer (benchmarks/requirements.txt): imported only when it runs
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAEGAN, Adversarial_AE, Adversarial_AE_Config, VAEGANConfig
    from pythae.trainers import (
        AdversarialTrainer,
        AdversarialTrainerConfig,
        CoupledOptimizerAdversarialTrainer,
        CoupledOptimizerAdversarialTrainerConfig,
        training_callbacks,
    )

    torch.manual_seed(args.seed)
    encoder, decoder = peers._pythae_modules(784, HIDDEN, LATENT)
    if kind == "aae":
        model = Adversarial_AE(Adversarial_AE_Config(input_dim=(1, 28, 28), latent_dim=LATENT, reconstruction_loss="bce",
                                                     adversarial_loss_scale=0.5), encoder, decoder)
    else:
        model = VAEGAN(VAEGANConfig(input_dim=(1, 28, 28), latent_dim=LATENT, reconstruction_layer=1), encoder, decoder)
    data = train_x.float().reshape(-1, 1, 28, 28)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(tempfile.TemporaryDirectory(prefix="pythae_"))
        common = dict(output_dir=out, num_epochs=args.epochs, per_device_train_batch_size=100, no_cuda=True, seed=args.seed)
        if kind == "aae":
            config = AdversarialTrainerConfig(**common, autoencoder_learning_rate=args.lr, discriminator_learning_rate=args.critic_lr)
            trainer_cls: Any = AdversarialTrainer
        else:
            config = CoupledOptimizerAdversarialTrainerConfig(**common, encoder_learning_rate=args.lr, decoder_learning_rate=args.lr,
                                                              discriminator_learning_rate=args.critic_lr)
            trainer_cls = CoupledOptimizerAdversarialTrainer
        stack.enter_context(mock.patch.object(training_callbacks, "tqdm", functools.partial(training_callbacks.tqdm, disable=True)))
        for logger in [n for n in list(logging.root.manager.loggerDict) if "pythae" in n]:
            stack.enter_context(mock.patch.object(logging.getLogger(logger), "disabled", True))
        trainer = trainer_cls(model=model, train_dataset=BaseDataset(data, torch.zeros(len(data))), training_config=config)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    model = trainer.model.eval()
    encode, decode_logits = peers.pythae_encode_decode(model)
    start = time.perf_counter()
    log_px, elbo = peers.importance_sampled_log_likelihood(encode, decode_logits, valid_x[: args.examples].float(), num_samples=args.samples)
    row = {"name": name, "elbo": elbo.mean().item(), "log_likelihood": log_px.mean().item(), "train_seconds": seconds,
           "examples_per_second": args.epochs * len(data) / seconds, "eval_seconds": time.perf_counter() - start}

    @torch.no_grad()
    def sample(n: int) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(decode_logits(torch.randn(n, LATENT))))

    return row, sample


def table(result: dict[str, Any]) -> str:
    lines = [result["setting"], "",
             "| model | -log p(x), IS | -ELBO | FD (project MLP features) | precision | recall | train s | images / s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {-r['log_likelihood']:.2f} | {-r['elbo']:.2f} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['train_seconds']:.0f} | {r['examples_per_second']:.0f} |")
    floor = result["floor"]
    lines += ["", f"Floor ({result['quality_samples']:,} training images against the validation images): FD {floor['fd']:.2f}, precision {floor['precision']:.3f}, "
              f"recall {floor['recall']:.3f}; the feature classifier is {result['features']} ({100 * result['feature_accuracy']:.1f}% "
              "accurate on the other t10k half).", "",
              "Differences: pythae's critics are its default Discriminator_MLP (one ReLU layer of 256, sigmoid output) and pyrovae's one "
              "leaky-ReLU layer of 256; pythae's VAE-GAN decoder descends 0.5 L_like - 0.5 of the critic's loss (and its equilibrium "
              "margin gating), pyrovae's L_like plus the non-saturating generator loss (Larsen et al.'s Algorithm 1); pythae reads "
              "the data through a DataLoader. The ELBO of an adversarial model is that of its Gaussian encoder, which no AAE "
              f"objective fits; log p(x) is importance-sampled with that encoder. Published: {ANCHOR}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="encoder and decoder")
    parser.add_argument("--critic-lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=100, help="importance samples per validation image")
    parser.add_argument("--examples", type=int, default=1000, help="validation images scored by IS")
    parser.add_argument("--quality-samples", type=int, default=5000)
    parser.add_argument("--peers", default="pyrovae,pythae")
    parser.add_argument("--data-dir", default=SHARED_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("binarized-mnist", args.data_dir)
    train_x, valid_x = data.split("train").x, data.split("valid").x
    network = feature_network(data, args.data_dir)
    real = network.features(valid_x[: args.quality_samples].float())
    rows = []
    runs = []
    if "pyrovae" in args.peers:
        runs += [lambda: pyrovae_row("pyrovae aae (weight 0.5)", "aae", {"weight": 0.5}, args),
                 lambda: pyrovae_row("pyrovae vae-gan (gamma 1)", "vae-gan", {"gamma": 1.0}, args)]
    if "pythae" in args.peers:
        runs += [lambda: pythae_row("pythae Adversarial_AE (adversarial_loss_scale 0.5)", "aae", args, train_x, valid_x),
                 lambda: pythae_row("pythae VAEGAN (defaults, reconstruction_layer 1)", "vaegan", args, train_x, valid_x)]
    for run in runs:
        torch.manual_seed(args.seed)
        row, sample = run()
        fake = network.features(sample(args.quality_samples).float())
        precision, recall = precision_recall(real, fake)
        rows.append({**row, "fd": frechet_distance(real, fake), "precision": precision, "recall": recall})
        print(rows[-1], flush=True)
    floor_features = network.features(train_x[: args.quality_samples].float())
    floor_precision, floor_recall = precision_recall(real, floor_features)
    setting = (f"Static binarized MNIST, 50,000 training images, {args.epochs} epochs of batch 100, encoder and decoder MLPs 784-200-200 tanh "
               f"with a {LATENT}-d Gaussian z and Bernoulli pixels, Adam {args.lr:g} (critics {args.critic_lr:g}), seed {args.seed}; log p(x) by "
               f"IS-{args.samples} on the first {args.examples} validation images; FD, precision and recall (k = 3) of {args.quality_samples} "
               f"samples x ~ p(x) against {args.quality_samples} validation images. Machine: {machine()}.")
    result = {"setting": setting, "rows": rows, "quality_samples": args.quality_samples, "features": network.source, "feature_accuracy": network.accuracy,
              "floor": {"fd": frechet_distance(real, floor_features), "precision": floor_precision, "recall": floor_recall}}
    write_results("adversarial", result, table(result))


if __name__ == "__main__":
    main()
