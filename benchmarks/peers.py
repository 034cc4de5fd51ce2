"""Peers of the Burda et al. (2016) binarized-MNIST VAE for benchmarking pyrovae: a plain PyTorch
loop and pythae, on one architecture (784-200-200 tanh -> mu, log-variance 50; 50-200-200-784 tanh
-> Bernoulli logits; N(0, I) prior; analytic KL; Adam 1e-3; batch 100), scored by one vectorized
importance-sampling estimator. Smoke check: ``python benchmarks/peers.py --self-test``."""
from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DecodeLogits = Callable[[torch.Tensor], torch.Tensor]
_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus}


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = [nn.Linear(sizes[0], sizes[1])]
    for a, b in zip(sizes[1:-1], sizes[2:]):
        layers += [_ACTIVATIONS[activation](), nn.Linear(a, b)]
    return nn.Sequential(*layers)


class HandwrittenVAE(nn.Module):
    """Gaussian-encoder / Bernoulli-decoder VAE; the encoder emits (mu, log-variance), or with
    ``scale="softplus"`` (mu, raw) with sigma = softplus(raw) + 1e-4, pyrovae's diagonal guide."""
    def __init__(self, input_dim: int, hidden: tuple[int, ...], latent: int, activation: str, scale: str = "logvar"):
        super().__init__()
        self.encoder = _mlp([input_dim, *hidden, 2 * latent], activation)
        self.decoder = _mlp([latent, *reversed(hidden), input_dim], activation)
        self.softplus_scale = scale == "softplus"

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, sigma) of q(z|x)."""
        mu, raw = self.encoder(x).chunk(2, dim=-1)
        return mu, (F.softplus(raw) + 1e-4 if self.softplus_scale else torch.exp(0.5 * raw))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, logvar) of q(z|x)."""
        mu, raw = self.encoder(x).chunk(2, dim=-1)
        return mu, (2 * torch.log(F.softplus(raw) + 1e-4) if self.softplus_scale else raw)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Return the Bernoulli logits of p(x|z)."""
        return self.decoder(z)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Single-sample reparameterized ELBO per example, with analytic KL."""
        if self.softplus_scale:
            mu, sigma = self.posterior(x)
            z = mu + sigma * torch.randn_like(mu)
            kl = (0.5 * (sigma.pow(2) + mu.pow(2) - 1) - sigma.log()).sum(-1)
        else:
            mu, logvar = self.encode(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
        rec = F.binary_cross_entropy_with_logits(self.decode_logits(z), x, reduction="none").sum(-1)
        return -(rec + kl)

    def sampled_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Single-sample ELBO with the KL estimated at the sample: log p(x|z) + log p(z) - log q(z|x)."""
        mu, std = self.posterior(x)
        eps = torch.randn_like(mu)
        z = mu + std * eps
        rec = F.binary_cross_entropy_with_logits(self.decode_logits(z), x, reduction="none").sum(-1)
        log_q = (-0.5 * eps.pow(2) - std.log()).sum(-1)
        log_p = (-0.5 * z.pow(2)).sum(-1)  # the log(2 pi) terms cancel
        return -rec + log_p - log_q


def handwritten_vae(input_dim: int = 784, hidden: tuple[int, ...] = (200, 200), latent: int = 50,
                    activation: str = "tanh", scale: str = "logvar") -> nn.Module:
    """Build the hand-written peer (PyTorch default init; seed with ``torch.manual_seed`` first)."""
    return HandwrittenVAE(input_dim, tuple(hidden), latent, activation, scale)


def train_handwritten(model: nn.Module, train_x_uint8: torch.Tensor, epochs: int,
                      batch_size: int = 100, lr: float = 1e-3, seed: int = 0) -> dict:
    """Plain loop: uint8 data in memory, ``randperm`` minibatches (last partial one kept), Adam,
    no scheduler; loss = -ELBO summed over pixels, averaged over the minibatch. ``final_train_elbo``
    is the mean per-batch ELBO over the last epoch (while training), the figure pythae logs too."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n, epoch_elbo = train_x_uint8.shape[0], float("nan")
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        total, batches = torch.zeros(()), torch.randperm(n).split(batch_size)
        for idx in batches:
            loss = -model.elbo(train_x_uint8[idx].float()).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        epoch_elbo = -(total / len(batches)).item()
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "examples_per_second": epochs * n / seconds,
            "epochs": epochs, "final_train_elbo": epoch_elbo}


def _pythae_modules(input_dim: int = 784, hidden: tuple[int, ...] = (200, 200), latent: int = 50):
    """pythae ``BaseEncoder``/``BaseDecoder`` instances of the MLP (pythae is imported lazily)."""
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    class MLPEncoder(BaseEncoder):
        """784-200-200 tanh -> ModelOutput(embedding=mu, log_covariance=logvar)."""
        def __init__(self) -> None:
            BaseEncoder.__init__(self)
            self.net = _mlp([input_dim, *hidden, 2 * latent], "tanh")

        def forward(self, x: torch.Tensor) -> ModelOutput:
            mu, logvar = self.net(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class MLPDecoder(BaseDecoder):
        """50-200-200-784 tanh -> ModelOutput(reconstruction=sigmoid(logits)) shaped (B,1,28,28)."""
        def __init__(self) -> None:
            BaseDecoder.__init__(self)
            self.net = _mlp([latent, *reversed(hidden), input_dim], "tanh")

        def logits(self, z: torch.Tensor) -> torch.Tensor:
            return self.net(z)

        def forward(self, z: torch.Tensor) -> ModelOutput:
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)).reshape(-1, 1, 28, 28))

    return MLPEncoder(), MLPDecoder()


def train_pythae(train_x_uint8: torch.Tensor, epochs: int, batch_size: int = 100, lr: float = 1e-3,
                 seed: int = 0, quiet: bool = True,
                 output_dir: str | None = None) -> tuple[nn.Module, dict]:
    """Train pythae's ``VAE`` with its own ``BaseTrainer``; return (last-iterate model, stats).

    pythae 0.1.2 settings (differences from :func:`train_handwritten` in brackets):
    * ``VAEConfig(input_dim=(1,28,28), latent_dim=50, reconstruction_loss="bce")``: loss =
      ``F.binary_cross_entropy`` on the decoder's sigmoid probabilities [not logits; each log
      term clamped at -100] summed over pixels + analytic KL, ``.mean(dim=0)`` over the batch
      (same per-step objective as the hand-written loss).
    * ``BaseTrainerConfig(optimizer_cls="Adam", learning_rate=lr [pythae default 1e-4],
      scheduler_cls=None [pythae 0.1.2 default: no lr decay], per_device_train_batch_size=
      batch_size [default 64], no_cuda=True, seed=seed)``; no checkpoints, predictions or amp;
      no eval set [so pythae sets keep_best_on_train=True and deep-copies the model at every
      epoch whose train loss improves]. Data: float32 (N,1,28,28) in a ``BaseDataset`` read by a
      shuffling ``DataLoader`` [num_workers=0, per-item indexing + default collate].
    * pythae saves its best-on-train model under ``output_dir`` (a temp dir if None); the model
      returned is ``trainer.model``, the last iterate. ``quiet`` mutes pythae's logs and tqdm bar.
    ``train_seconds``: first ``on_epoch_begin`` to last ``on_epoch_end`` (train steps, bar, deep
    copies); ``train_call_seconds``: all of ``trainer.train()`` (adds setup and the final save).
    Not timed: building the trainer (DataLoader, one sanity-check forward pass)."""
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.trainers import BaseTrainer, BaseTrainerConfig, training_callbacks
    from pythae.trainers.training_callbacks import TrainingCallback

    class Timer(TrainingCallback):
        """Records ``perf_counter`` at each epoch's begin and end, and the logged epoch losses."""
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_epoch_begin(self, training_config, **kwargs) -> None:
            self.times.append(time.perf_counter())

        on_epoch_end = on_epoch_begin

        def on_log(self, training_config, logs, **kwargs) -> None:
            self.losses.append(float(logs["train_epoch_loss"]))

    torch.manual_seed(seed)
    model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=50, reconstruction_loss="bce"),
                *_pythae_modules())
    data = train_x_uint8.float().reshape(-1, 1, 28, 28)
    dataset, timer = BaseDataset(data, torch.zeros(data.shape[0])), Timer()
    with contextlib.ExitStack() as stack:
        out = output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="pythae_"))
        config = BaseTrainerConfig(output_dir=out, num_epochs=epochs, learning_rate=lr,
                                   per_device_train_batch_size=batch_size, optimizer_cls="Adam",
                                   scheduler_cls=None, no_cuda=True, seed=seed)
        if quiet:  # mute pythae's console loggers and build its tqdm bars with disable=True
            bar = functools.partial(training_callbacks.tqdm, disable=True)
            stack.enter_context(mock.patch.object(training_callbacks, "tqdm", bar))
            for name in [n for n in list(logging.root.manager.loggerDict) if "pythae" in n]:
                stack.enter_context(mock.patch.object(logging.getLogger(name), "disabled", True))
        trainer = BaseTrainer(model=model, train_dataset=dataset, training_config=config,
                              callbacks=[timer])
        start = time.perf_counter()
        trainer.train()
        call_seconds = time.perf_counter() - start
    seconds = timer.times[-1] - timer.times[0]
    return trainer.model.eval(), {
        "train_seconds": seconds, "examples_per_second": epochs * data.shape[0] / seconds,
        "train_call_seconds": call_seconds, "epochs": epochs, "final_train_elbo": -timer.losses[-1],
        "scheduler": None if trainer.scheduler is None else type(trainer.scheduler).__name__}


def handwritten_encode_decode(model: nn.Module) -> tuple[Encode, DecodeLogits]:
    """Adapters (encode -> (mu, std), decode_logits) for a :func:`handwritten_vae` model."""
    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = model.encode(x)
        return mu, torch.exp(0.5 * logvar)
    return encode, model.decode_logits


def pythae_encode_decode(model: nn.Module) -> tuple[Encode, DecodeLogits]:
    """Adapters for a pythae ``VAE``; uses the decoder's ``logits`` when it has one."""
    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model.encoder(x.reshape(x.shape[0], *model.model_config.input_dim))
        return out.embedding, torch.exp(0.5 * out.log_covariance)

    def decode_logits(z: torch.Tensor) -> torch.Tensor:
        if hasattr(model.decoder, "logits"):
            return model.decoder.logits(z).reshape(z.shape[0], -1)
        return torch.logit(model.decoder(z).reconstruction.reshape(z.shape[0], -1), eps=1e-7)
    return encode, decode_logits


def importance_sampled_log_likelihood(
        encode: Encode, decode_logits: DecodeLogits, x: torch.Tensor, num_samples: int = 5000,
        chunk_examples: int = 100, max_elements: int = 2 ** 26,
        noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (log p(x) ~ logmeanexp_k log w_k, ELBO ~ mean_k log w_k), proposals q(z|x).

    log w_k = log p(x|z_k) + log N(z_k; 0, I) - log q(z_k|x), z_k = mu + std * eps_k. Examples are
    taken ``chunk_examples`` at a time and samples S at a time, S * chunk * D <= ``max_elements``
    (D = data dimension: the decoder's logits are the widest tensor); the logsumexp is streamed
    over sample chunks. ``noise`` (num_samples, N, latent) fixes eps (tests); else torch's RNG."""
    x = x.reshape(x.shape[0], -1)
    n, d = x.shape
    chunk = max(1, min(chunk_examples, max_elements // d))
    log_px, elbo = [], []
    with torch.no_grad():
        for i in range(0, n, chunk):
            xb = x[i:i + chunk] if x.is_floating_point() else x[i:i + chunk].float()
            b = xb.shape[0]
            mu, std = encode(xb)
            s_chunk = max(1, max_elements // (b * max(d, mu.shape[-1])))
            lse, total = mu.new_full((b,), -math.inf), mu.new_zeros(b)
            for k in range(0, num_samples, s_chunk):
                s = min(s_chunk, num_samples - k)
                eps = (torch.randn_like(mu.expand(s, b, -1)) if noise is None
                       else noise[k:k + s, i:i + b].to(mu))
                z = mu + std * eps
                logits = decode_logits(z.reshape(s * b, -1)).reshape(s, b, d)
                log_px_z = -F.binary_cross_entropy_with_logits(
                    logits, xb.expand(s, b, d), reduction="none").sum(-1)
                # log N(z;0,I) - log N(z;mu,std): the 0.5*log(2*pi) terms cancel.
                log_w = log_px_z - 0.5 * z.pow(2).sum(-1) + 0.5 * eps.pow(2).sum(-1) \
                    + std.log().sum(-1)
                lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
                total += log_w.sum(0)
            log_px.append(lse - math.log(num_samples))
            elbo.append(total / num_samples)
    return torch.cat(log_px), torch.cat(elbo)


def load_binarized_mnist(split: str, shared: Path = Path("/work/shared/data")) -> torch.Tensor:
    """Read binarized_mnist_{split}.amat.gz (784 space-separated 0/1 per line) as (N,784) uint8."""
    with gzip.open(Path(shared) / "binarized_mnist" / f"binarized_mnist_{split}.amat.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8)
    digits = raw[(raw == ord("0")) | (raw == ord("1"))] - ord("0")
    rows = int(np.count_nonzero(raw == ord("\n"))) + int(raw[-1] != ord("\n"))
    if digits.size != rows * 784:
        raise ValueError(f"{split}: {digits.size} 0/1 values in {rows} lines, not 784 a line")
    return torch.from_numpy(digits.reshape(rows, 784).copy())


def _naive_is(encode: Encode, decode_logits: DecodeLogits, x: torch.Tensor,
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchunked reference estimator written with torch.distributions."""
    from torch.distributions import Bernoulli, Normal
    with torch.no_grad():
        x = x if x.is_floating_point() else x.float()
        mu, std = encode(x)
        z = mu + std * noise.to(mu)                                   # (K, N, L)
        logits = decode_logits(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:2], -1)
        log_w = (Bernoulli(logits=logits).log_prob(x).sum(-1)
                 + Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(mu, std).log_prob(z).sum(-1))
        return torch.logsumexp(log_w, 0) - math.log(noise.shape[0]), log_w.mean(0)


def _self_test() -> None:
    """Smoke-train both peers on 2000 images, score 200 valid images, cross-check the estimator."""
    torch.manual_seed(0)
    train, valid = load_binarized_mnist("train")[:2000], load_binarized_mnist("valid")[:200]
    hw = handwritten_vae()
    peers = [("handwritten", hw, train_handwritten(hw, train, epochs=1), handwritten_encode_decode),
             ("pythae", *train_pythae(train, epochs=1), pythae_encode_decode)]
    for name, model, stats, adapt in peers:
        log_px, elbo = importance_sampled_log_likelihood(*adapt(model), valid, num_samples=50)
        assert torch.isfinite(log_px).all() and torch.isfinite(elbo).all(), name
        assert (log_px - elbo).mean() >= 0, name
        print(f"{name}: {stats}\n  IS-50 valid[:200]: log p(x) {log_px.mean():.3f}, "
              f"ELBO {elbo.mean():.3f}, frac(log p >= ELBO) {(log_px >= elbo).float().mean():.3f}")
        for dtype in (torch.float32, torch.float64):  # 3 example chunks x 10 sample chunks
            xs, noise = valid[:5].to(dtype), torch.randn(64, 5, 50)
            enc, dec = adapt(model.to(dtype))
            chunked = importance_sampled_log_likelihood(enc, dec, xs, 64, 2, 2 * 784 * 7, noise)
            err = max((a - b).abs().max().item()
                      for a, b in zip(chunked, _naive_is(enc, dec, xs, noise.to(dtype))))
            print(f"  chunked vs naive ({dtype}, 5 examples, 64 samples): max |diff| {err:.2e}")
            assert err < 1e-4, (name, dtype, err)
        model.to(torch.float32)
    print("self-test passed")


if __name__ == "__main__":
    _self_test() if "--self-test" in sys.argv[1:] else sys.exit("usage: peers.py --self-test")
