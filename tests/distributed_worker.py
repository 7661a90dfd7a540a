"""What each rank runs in tests/test_distributed.py (2 processes, gloo on loopback).

Every scenario writes its facts to ``out/<scenario>-<rank>.pt``; the test process compares them
with a single-process run of the same plan. The scenario that kills a rank runs last.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dpclip

N, B, STEPS = 64, 16, 4
DEVICE = torch.device("cpu")  # cuda:<rank> under nccl


def build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    return model.double().to(DEVICE)


def ddp(model: nn.Module, **options) -> DistributedDataParallel:
    ids = [DEVICE.index] if DEVICE.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **options)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    return x.to(DEVICE), torch.randint(0, 3, (N,), generator=g).to(DEVICE)


def engine_for(model: nn.Module, optimizer: torch.optim.Optimizer, **kw) -> dpclip.PrivacyEngine:
    settings = dict(sample_size=N, batch_size=B, steps=STEPS, noise_multiplier=0.0, seed=7)
    settings.update(kw)
    return dpclip.PrivacyEngine(model, optimizer, **settings)


def global_batches(step: int) -> torch.Tensor:
    """The fixed global batch of ``step`` (indices), the same on every rank."""
    return torch.arange(step * B, (step + 1) * B) % N


def train_fixed(model, optimizer, rank: int, world: int, steps: int, physical: int, start=0):
    """Train on the fixed global batches, this rank taking every world-th example."""
    x, y = data()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for step in range(start, start + steps):
        mine = global_batches(step)[rank::world]
        for chunk in mine.split(physical):
            loss_fn(model(x[chunk]), y[chunk]).backward()
        optimizer.step()
        optimizer.zero_grad()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return [p.detach().clone() for p in inner.parameters()]


def save(out: Path, name: str, rank: int, facts: dict) -> None:
    torch.save(facts, out / f"{name}-{rank}.pt")


# --------------------------------------------------------------------------- scenarios
def update_equals_single_process(out: Path, rank: int, world: int) -> None:
    for wrap in ("ddp", "ddp-options", "plain"):
        model = build_model()
        if wrap == "ddp":
            model = ddp(model)
        elif wrap == "ddp-options":
            model = ddp(model, find_unused_parameters=True, gradient_as_bucket_view=True)
        else:  # an unwrapped model initialised differently per rank starts from rank 0's
            with torch.no_grad():
                model[0].weight.add_(rank)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        engine = engine_for(model, opt, loss_reduction="sum")
        train_fixed(model, opt, rank, world, steps=2, physical=3)
        save(out, f"update-{wrap}", rank, {"params": params_of(model), "eps": engine.epsilon()})
        engine.detach()


def noise_once(out: Path, rank: int, world: int) -> None:
    """Two runs on the same data, noise off and on: their difference is the noise alone."""
    results = {}
    for sigma in (0.0, 2.0):
        torch.manual_seed(0)
        model = ddp(nn.Linear(100, 100, dtype=torch.float64, device=DEVICE))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        engine = engine_for(model, opt, noise_multiplier=sigma, clip_norm=3.0)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(8, 100, dtype=torch.float64, generator=g).to(DEVICE)
        model(x).sum().backward()
        opt.step()
        results[sigma] = params_of(model)
        engine.detach()
    noise = [a - b for a, b in zip(results[0.0], results[2.0], strict=True)]
    save(out, "noise", rank, {"noise": noise})


def poisson_shares(out: Path, rank: int, world: int) -> None:
    """Poisson steps with noise, DDP and AdamW: the shares, the parameters and ε."""
    model = ddp(build_model())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine = engine_for(model, opt, noise_multiplier=1.0, steps=40, batch_size=4)
    x, y = data()
    dataset = torch.utils.data.TensorDataset(torch.arange(N, device=DEVICE), x, y)
    gen = torch.Generator().manual_seed(100 + rank)  # only rank 0's counts
    shares, params = [], []
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):  # two passes over the loader: a fresh shared seed each
        for logical in engine.data_loader(dataset, physical_batch_size=2, generator=gen):
            shares.append(logical.indices.clone())
            for idx, xb, yb in logical:
                assert torch.equal(xb, x[idx])
                loss_fn(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            params.append(params_of(model))
    save(out, "poisson", rank, {
        "shares": shares, "params": params, "eps": engine.epsilon(), "steps": engine.steps_taken,
    })  # fmt: skip
    engine.detach()


def resume(out: Path, rank: int, world: int) -> None:
    """Two steps, a checkpoint saved by rank 0, a fresh model and engine on every rank loading
    it, two more steps: the same as four uninterrupted steps."""

    def fresh():
        model = ddp(build_model())
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        return model, opt, engine_for(model, opt, noise_multiplier=0.8)

    model, opt, engine = fresh()
    train_fixed(model, opt, rank, world, steps=4, physical=8)
    whole = {"params": params_of(model), "eps": engine.epsilon()}
    engine.detach()

    model, opt, engine = fresh()
    train_fixed(model, opt, rank, world, steps=2, physical=8)
    path = out / "checkpoint.pt"
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(),
                    "engine": engine.state_dict()}, path)  # fmt: skip
    dist.barrier()
    engine.detach()
    model, opt, engine = fresh()
    state = torch.load(path, weights_only=False, map_location=DEVICE)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    engine.load_state_dict(state["engine"])
    train_fixed(model, opt, rank, world, steps=2, physical=8, start=2)
    save(out, "resume", rank, {
        "whole": whole, "resumed": {"params": params_of(model), "eps": engine.epsilon()},
    })  # fmt: skip
    engine.detach()


def refusals(out: Path, rank: int, world: int) -> None:
    """A rank whose step is refused stops the other too, before anything changes; so do ranks
    with different settings at attach, and ranks at different step counts."""
    facts = {}
    model = ddp(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = engine_for(model, opt)
    before = params_of(model)
    x, y = data()
    try:
        xb = x[:4].clone()
        if rank == 1:
            xb[0] = float("nan")
        try:
            nn.CrossEntropyLoss()(model(xb), y[:4]).backward()
        except dpclip.NonFiniteNormError:
            pass  # a loop that carries on to the step: the step is refused on every rank
        opt.step()
    except Exception as err:
        facts["refused"] = f"{type(err).__name__}: {err}"
    facts["unchanged"] = all(
        torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True)
    )
    facts["steps"] = engine.steps_taken
    engine.detach()

    model = ddp(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    try:
        engine_for(model, opt, batch_size=B + rank)
    except ValueError as err:
        facts["settings"] = str(err)
    model = ddp(build_model(), static_graph=True)
    try:
        engine_for(model, torch.optim.SGD(model.parameters(), lr=0.5))
    except ValueError as err:
        facts["static_graph"] = str(err)
    save(out, "refusals", rank, facts)


def step_refused_everywhere(model, opt, engine, before, error=dpclip.DistributedStepError) -> dict:
    """Try the step: dpclip's ``error`` (if raised), whether the parameters are still
    ``before``, and the ledger's steps."""
    facts = {}
    try:
        opt.step()
    except error as err:
        facts["error"] = str(err)
    facts["unchanged"] = all(
        torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True)
    )
    facts["steps"] = engine.steps_taken
    return facts


def skipped_draw(out: Path, rank: int, world: int) -> None:
    """Rank 1 goes on to the next logical batch without stepping (a `continue` on an empty
    share): the step would sum shares of two samples; every rank refuses it."""
    model = ddp(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = engine_for(model, opt, batch_size=4)
    x, y = data()
    dataset = torch.utils.data.TensorDataset(x, y)
    logical_batches = iter(engine.data_loader(dataset, generator=torch.Generator().manual_seed(3)))
    logical = next(logical_batches)
    if rank == 1:
        logical = next(logical_batches)  # the skipped one
    for xb, yb in logical:
        nn.CrossEntropyLoss()(model(xb), yb).backward()
    facts = step_refused_everywhere(model, opt, engine, params_of(model))
    engine.detach()
    save(out, "skipped", rank, facts)


def per_rank_batch_declared_global(out: Path, rank: int, world: int) -> None:
    """Each rank trains on a batch of its own loader (a DistributedSampler's share) as large as
    the global batch_size declared: the world samples at twice the ledger's rate. Each share
    alone is plausible at q; the step's count over the ranks is not, and every rank refuses."""
    model = ddp(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = engine_for(model, opt, batch_size=4)
    x, y = data()
    mine = torch.arange(rank * 16, (rank + 1) * 16)
    nn.CrossEntropyLoss()(model(x[mine]), y[mine]).backward()
    facts = step_refused_everywhere(model, opt, engine, params_of(model), dpclip.SampleRateError)
    engine.detach()
    save(out, "per-rank-batch", rank, facts)


# fp16 with a GradScaler: step 1 overflows on rank 1 only (one example's loss weighted up), and
# step 2's global batch has one example, so rank 1's share is empty
FP16_BATCHES = [torch.arange(0, 16), torch.arange(16, 32), torch.tensor([40]), torch.arange(48, 64)]
FP16_HEAVY, FP16_SCALE = 17, 2.0**12


def train_fp16(model, optimizer, scaler, rank: int, world: int, physical: int = 3) -> list[float]:
    """fp16 autocast steps through ``scaler`` on :data:`FP16_BATCHES`, this rank taking every
    world-th example; returns the loss scale after each step."""
    x, y = data()
    x = x.float()
    weights = torch.ones(N, device=DEVICE)
    weights[FP16_HEAVY] = 1e3  # its scaled gradient overflows fp16
    scales = []
    for batch in FP16_BATCHES:
        for chunk in batch[rank::world].split(physical):
            with torch.autocast(DEVICE.type, dtype=torch.float16):
                losses = nn.functional.cross_entropy(model(x[chunk]), y[chunk], reduction="none")
            scaler.scale((losses.float() * weights[chunk]).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        scales.append(scaler.get_scale())
    return scales


def fp16_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.Adam(params, lr=0.05, fused=True)  # unscales inside its own kernel


def fp16_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler(DEVICE.type, init_scale=FP16_SCALE, growth_interval=1000)


def fp16_overflow(out: Path, rank: int, world: int) -> None:
    """A backward that overflows on one rank: every rank skips that step, and goes on."""
    for name in ("sgd", "fused-adam"):
        model = ddp(build_model().float())
        opt = fp16_optimizer(name, model.parameters())
        scaler = fp16_scaler()
        engine = engine_for(model, opt, loss_reduction="sum", grad_scaler=scaler)
        scales = train_fp16(model, opt, scaler, rank, world)
        save(out, f"fp16-{name}", rank, {
            "params": params_of(model), "steps": engine.steps_taken, "scales": scales,
        })  # fmt: skip
        engine.detach()


def rank_dies(out: Path, rank: int, world: int) -> None:
    """Rank 1 dies before the step: rank 0 gets dpclip's error, not a hang."""
    model = ddp(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = engine_for(model, opt)
    before = params_of(model)
    x, y = data()
    nn.CrossEntropyLoss()(model(x[:4]), y[:4]).backward()
    if rank == 1:
        sys.stdout.flush()
        os._exit(3)
    save(out, "dies", rank, step_refused_everywhere(model, opt, engine, before))


SCENARIOS = [
    update_equals_single_process,
    noise_once,
    poisson_shares,
    resume,
    refusals,
    skipped_draw,
    per_rank_batch_declared_global,
    fp16_overflow,
]


def main(rank: int, world: int, port: int, out: str, backend: str = "gloo") -> None:
    global DEVICE
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    path = Path(out)
    for scenario in SCENARIOS:
        scenario(path, rank, world)
        dist.barrier()
    if backend == "gloo":  # nccl does not notice a dead peer before its timeout
        rank_dies(path, rank, world)
    os._exit(0)  # skip destroy_process_group: the other rank is gone
