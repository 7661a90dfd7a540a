"""Operations dispatched per training step (issue: host overhead on GPUs): exact counts, no timing.

The ceilings are the counts reached so far; the goal is at most 1.5× non-private training on
both reference points. A change that dispatches more per step fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's `benchmarks`

from benchmarks.ops import REFERENCES, build_step, count_step  # noqa: E402

CEILINGS = {"gpt-like-small": 1.3, "cnn": 1.5}  # dpclip ops / non-private ops


@pytest.mark.parametrize("ref", [r for r in REFERENCES if r.name in CEILINGS], ids=lambda r: r.name)
def test_dpclip_dispatches_at_most_its_ceiling_of_non_private_ops(ref):
    plain, private = build_step(ref, "non-private"), build_step(ref, "dpclip")
    base, dp = count_step(plain), count_step(private)
    assert count_step(private).ops == dp.ops  # exact: the same operations every step
    assert dp.ops["aten.normal_"] >= 1 and private.engine.steps_taken == 4  # private steps
    assert dp.total <= CEILINGS[ref.name] * base.total, (dp.total, base.total)
    assert "aten._local_scalar_dense" not in base.ops
    # one host read per step at most: the finite check of the norms (and a CPU noise seed)
    assert dp.ops["aten._local_scalar_dense"] <= 2


def test_on_an_accelerator_forward_and_backward_never_wait_for_the_device(monkeypatch):
    """A host read of a device tensor (``aten._local_scalar_dense``) makes the host wait for the
    device, which then idles while the host queues what follows. On an accelerator the one read
    the step needs, the finiteness of the norms, waits for the optimizer step."""
    from benchmarks.ops import OpCounter

    from dpclip import _bookkeeping

    monkeypatch.setattr(_bookkeeping, "checks_at_step", lambda device: True)
    ref = next(r for r in REFERENCES if r.name == "gpt-like-small")
    step = build_step(ref, "dpclip")
    model, opt = step.engine.model, step.engine.optimizer
    x, y = step.batch
    for k in range(2):  # two micro-batches, one logical step
        with OpCounter() as backward:
            step.loss_fn(model(x), y).backward()
        assert "aten._local_scalar_dense" not in backward.ops, k
    with OpCounter() as at_step:
        opt.step()
    opt.zero_grad(set_to_none=True)
    assert at_step.ops["aten._local_scalar_dense"] >= 1  # the check, once for both


def test_the_parameter_guard_sees_the_models_torch_calls_and_none_of_dpclips():
    """The guard's torch function mode runs Python on every torch call of a forward: dpclip's
    own calls in its hooks (detach, shape reads, register_hook) are kept out of it, which is
    host time on every step, and the guard has nothing to check in them."""
    from torch.overrides import TorchFunctionMode

    from dpclip import _param_guard

    ref = next(r for r in REFERENCES if r.name == "tiny-mlp")
    step = build_step(ref, "dpclip")
    seen: list[str] = []
    base = _param_guard._Mode

    class Seeing(base):  # the guard's own mode, recording what reaches it
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", repr(func)))
            return super().__torch_function__(func, types, args, kwargs)

    assert issubclass(base, TorchFunctionMode)
    _param_guard._Mode = Seeing
    try:
        step()
    finally:
        _param_guard._Mode = base
    assert seen == ["linear", "tanh", "linear"]  # nn.Sequential(Linear, Tanh, Linear)
