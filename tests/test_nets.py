"""The likelihood heads' distributions agree with torch's own."""

import pyro.distributions as dist
import torch

from pyrovae.nets import IndependentBernoulli


def test_independent_bernoulli_is_torchs_bernoulli_with_and_without_gradients():
    logits = (3 * torch.randn(7, 5, 30)).requires_grad_()
    x = torch.bernoulli(torch.rand(5, 30))  # broadcast over the 7 samples, as in evaluation
    expected = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    with torch.no_grad():
        fast = IndependentBernoulli(logits).log_prob(x)  # the matrix-product form
    assert fast.shape == (7, 5)
    assert torch.allclose(fast, expected, atol=1e-4)
    slow = IndependentBernoulli(logits).log_prob(x)
    (grad,) = torch.autograd.grad(slow.sum(), logits)
    assert torch.allclose(grad, (x - torch.sigmoid(logits)).detach(), atol=1e-6)
    expanded = IndependentBernoulli(logits.detach()).expand((2, 7, 5))
    assert isinstance(expanded, IndependentBernoulli) and expanded.sample().shape == (2, 7, 5, 30)
