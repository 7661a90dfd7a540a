"""The engine on a CUDA device: same update as the naive loop, noise drawn on the device.

Skipped where no GPU is present (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpclip
from tests import engine_models
from tests.test_engine_oracle import run_one_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"


@pytest.mark.parametrize("strategy", ["ghost", "instantiate", "mixed"])
@pytest.mark.parametrize("name", sorted(engine_models.CASES))
def test_update_on_cuda_equals_naive_loop(name, strategy):
    run_one_step(name, "automatic", "all-layer", "mean", device=CUDA, norm_strategy=strategy)


@pytest.mark.parametrize("style", ["layer-wise", "param-wise"])
def test_update_on_cuda_equals_naive_loop_for_group_styles(style):
    run_one_step("gpt2_tiny", "abadi", style, "sum", device=CUDA)


def _zero_model_update(seed: int | None, steps: int = 2, secure: bool = False):
    model = nn.Linear(300, 200, bias=False).to(CUDA)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=1000, batch_size=16, steps=steps, noise_multiplier=2.0,
        clip_norm=3.0, seed=seed, secure_rng=secure,
    )  # fmt: skip
    x = torch.zeros(4, 300, device=CUDA)
    updates = []
    for _ in range(steps):
        before = model.weight.detach().clone()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        updates.append(before - model.weight.detach())
    return engine, updates


def test_noise_is_drawn_on_the_device_with_std_sigma_r_over_b_and_fresh_each_step():
    engine, updates = _zero_model_update(seed=0)
    assert list(engine._noise._generators) == ["cuda:0"]
    for u in updates:
        assert u.device.type == "cuda"
        assert abs(u.std().item() / (2.0 * 3.0 / 16) - 1) < 0.02
    pair = torch.stack([updates[0].flatten(), updates[1].flatten()])
    assert torch.corrcoef(pair)[0, 1].abs() < 0.02


def test_seeded_noise_on_cuda_is_reproducible_and_secure_noise_is_not():
    _, a = _zero_model_update(seed=5)
    _, b = _zero_model_update(seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    _, c = _zero_model_update(seed=None, secure=True)
    _, d = _zero_model_update(seed=None, secure=True)
    assert not torch.equal(c[0], d[0])


def test_cuda_noise_state_round_trips_through_state_dict():
    engine, _ = _zero_model_update(seed=1, steps=3)
    state = engine._noise.state_dict()
    draw = torch.zeros(1000, device=CUDA)
    engine._noise.add_([draw])
    engine._noise.load_state_dict(state)
    again = torch.zeros(1000, device=CUDA)
    engine._noise.add_([again])
    assert torch.equal(draw, again)


def test_bf16_autocast_on_cuda_trains_and_keeps_float32_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dpclip.PrivacyEngine(model, opt, sample_size=100, batch_size=8, steps=2, noise_multiplier=0.0)
    x, y = torch.randn(8, 8, device=CUDA), torch.randint(0, 4, (8,), device=CUDA)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())
    assert all(
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    )


def test_on_cuda_a_nan_loss_refuses_the_step_and_the_backward_does_not_wait_for_the_device():
    model = nn.Linear(6, 3).to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=100, batch_size=4, steps=2, noise_multiplier=1.0
    )
    x, y = torch.randn(4, 6, device=CUDA), torch.arange(4, device=CUDA) % 3
    x[1, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()  # no error here: the flag stays on the device
    with pytest.raises(dpclip.NonFiniteNormError, match="refusing to step"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert engine.steps_taken == 0
