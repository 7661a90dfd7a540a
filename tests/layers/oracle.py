"""The oracle for every layer rule: each sample alone, forward, backward, read the gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpclip.layers import STRATEGIES, default_registry

REGISTRY = default_registry()


def naive_per_sample_grads(
    module: nn.Module, inputs: tuple, grad_output: Tensor
) -> dict[str, Tensor]:
    """{name: (b, *param.shape)} by running each sample through the module on its own."""
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    per_sample: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in range(grad_output.shape[0]):
        module.zero_grad(set_to_none=True)
        out = module(*(x[i : i + 1] for x in inputs))
        out.backward(grad_output[i : i + 1])
        for n in names:
            grad = getattr(module, n).grad
            per_sample[n].append(
                torch.zeros_like(getattr(module, n)) if grad is None else grad.clone()
            )
    module.zero_grad(set_to_none=True)
    return {n: torch.stack(gs) for n, gs in per_sample.items()}


def assert_rule_matches_oracle(
    module: nn.Module, inputs: tuple, grad_output: Tensor, rtol: float = 1e-6
) -> None:
    """norm_sq (every strategy), clipped_grad and per_sample_grad all equal the naive loop."""
    rule = REGISTRY.rule_for(module)
    assert rule is not None, f"no rule for {type(module).__name__}"
    expected = naive_per_sample_grads(module, inputs, grad_output)
    names = list(expected)
    b = grad_output.shape[0]
    detached = tuple(x.detach() for x in inputs)
    for strategy in STRATEGIES:
        got = rule.norm_sq(module, detached, grad_output, names, strategy)
        assert set(got) == set(names)
        for n in names:
            want = expected[n].reshape(b, -1).square().sum(dim=1)
            torch.testing.assert_close(got[n], want, rtol=rtol, atol=1e-10, msg=f"{n} {strategy}")
    factors = {
        n: torch.rand(b, dtype=grad_output.dtype, generator=torch.Generator().manual_seed(1))
        for n in names
    }
    got = rule.clipped_grad(module, detached, grad_output, factors)
    for n in names:
        want = torch.einsum("b,b...->...", factors[n], expected[n])
        torch.testing.assert_close(got[n], want, rtol=rtol, atol=1e-10, msg=n)
    if rule.per_sample_grad is not None:
        got = rule.per_sample_grad(module, detached, grad_output, names)
        for n in names:
            torch.testing.assert_close(got[n], expected[n], rtol=rtol, atol=1e-10, msg=n)
