"""Data-parallel DP on torch.distributed: two processes (gloo on loopback) against one process.

One launch runs every scenario of tests/distributed_worker.py; each test checks one property.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import dpclip
from dpclip import accounting
from dpclip.data import PoissonLoader
from tests import distributed_worker as worker
from tests.ports import free_port

WORLD = 2


def _launch(out: Path, backend: str) -> list[int | None]:
    context = mp.start_processes(
        worker.main, args=(WORLD, free_port(), str(out), backend), nprocs=WORLD,
        start_method="spawn", join=False,
    )  # fmt: skip
    for process in context.processes:
        process.join(240)
    codes = [p.exitcode for p in context.processes]
    for p in context.processes:
        if p.is_alive():
            p.kill()
    return codes


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    codes = _launch(out, "gloo")
    assert codes == [0, 3], f"worker exit codes {codes} (rank 1 exits 3 on purpose, last)"

    def load(name: str, ranks: int = WORLD) -> list[dict]:
        return [torch.load(out / f"{name}-{r}.pt", weights_only=False) for r in range(ranks)]

    return load


def _single_process_fixed(steps: int, physical: int, optimizer, **kw) -> tuple[list, float]:
    """The same plan in one process: the whole global batch, physical batches of ``physical``."""
    model = worker.build_model()
    opt = optimizer(model.parameters())
    engine = worker.engine_for(model, opt, **kw)
    worker.train_fixed(model, opt, rank=0, world=1, steps=steps, physical=physical)
    return worker.params_of(model), engine.epsilon()


def _equal(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("wrap", ["ddp", "ddp-options", "plain"])
def test_update_without_noise_equals_one_process_on_the_global_batch(ran, wrap):
    ranks = ran(f"update-{wrap}")  # "plain": rank 1 initialised its model differently
    expected, _ = _single_process_fixed(
        2, 5, lambda p: torch.optim.SGD(p, lr=0.5), loss_reduction="sum"
    )
    assert _equal(ranks[0]["params"], ranks[1]["params"])  # bit-identical on both ranks
    for got, want in zip(ranks[0]["params"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_noise_is_drawn_once_per_step_with_std_sigma_r_over_b(ran):
    ranks = ran("noise")
    assert _equal(ranks[0]["noise"], ranks[1]["noise"])
    noise = torch.cat([t.flatten() for t in ranks[0]["noise"]])
    expected = 2.0 * 3.0 / worker.B  # σ R / B, over the global B; √2 times that if drawn per rank
    assert abs(noise.std().item() / expected - 1) < 0.03
    assert abs(noise.mean().item()) < 0.03 * expected


def test_poisson_shares_are_disjoint_and_their_union_is_the_shared_sample(ran):
    ranks = ran("poisson")
    assert ranks[0]["steps"] == ranks[1]["steps"] == len(ranks[0]["shares"])
    q = 4 / worker.N
    rank0_generator = torch.Generator().manual_seed(100)
    steps_per_pass = accounting.steps_per_epoch(q)
    shares = list(zip(ranks[0]["shares"], ranks[1]["shares"], strict=True))
    assert len(shares) == 2 * steps_per_pass
    for start in (0, steps_per_pass):
        seed = int(torch.randint(0, 2**62, (1,), generator=rank0_generator))
        g = torch.Generator().manual_seed(seed)
        for s0, s1 in shares[start : start + steps_per_pass]:
            uniform = torch.rand(worker.N, generator=g, dtype=torch.float64)
            sample = (uniform < q).nonzero().flatten()
            assert torch.equal(s0, sample[0::2]) and torch.equal(s1, sample[1::2])
    assert any(len(s0) == 0 or len(s1) == 0 for s0, s1 in shares)  # noise-only steps happen


def test_parameters_stay_bit_identical_and_epsilon_equals_one_process(ran):
    ranks = ran("poisson")
    for step0, step1 in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert _equal(step0, step1)
    assert not _equal(ranks[0]["params"][0], ranks[0]["params"][-1])  # it trained
    ledger = accounting.PrivacyLedger("pld")
    ledger.record(1.0, 4 / worker.N, ranks[0]["steps"])
    expected = ledger.epsilon(accounting.default_delta(worker.N))
    assert ranks[0]["eps"] == ranks[1]["eps"] == pytest.approx(expected, rel=1e-12)


def test_resume_from_rank_0_checkpoint_equals_the_uninterrupted_run_on_every_rank(ran):
    for facts in ran("resume"):
        assert _equal(facts["resumed"]["params"], facts["whole"]["params"])
        assert facts["resumed"]["eps"] == facts["whole"]["eps"] > 0


def test_a_refused_step_on_one_rank_is_refused_on_every_rank_and_changes_nothing(ran):
    rank0, rank1 = ran("refusals")
    assert rank1["refused"].startswith("NonFiniteNormError: refusing to step")
    assert rank0["refused"].startswith("DistributedStepError: dpclip.distributed: another rank")
    assert "rank 1: NonFiniteNormError" in rank0["refused"]
    assert rank0["unchanged"] and rank1["unchanged"] and rank0["steps"] == rank1["steps"] == 0


def test_ranks_with_different_settings_or_a_static_graph_are_refused_at_attach(ran):
    for facts in ran("refusals"):
        assert "different batch_size (rank 0: 16, rank 1: 17)" in facts["settings"]
        assert "static_graph" in facts["static_graph"]


def test_a_rank_that_skips_a_logical_batch_makes_every_rank_refuse_the_step(ran):
    """Its share of another sample would be summed into this step, silently, and the ranks
    would hang at the next pass; the step agreement compares the draws."""
    for facts in ran("skipped"):
        assert "different logical batches" in facts["error"] and "not applied" in facts["error"]
        assert facts["unchanged"] and facts["steps"] == 0


def test_a_per_rank_batch_declared_as_the_global_one_is_refused_on_every_rank(ran):
    """The count is summed over the ranks: 16 per rank is plausible at q = 4/64 alone, the
    world's 32 is not (the ledger would charge half the true sampling rate)."""
    for facts in ran("per-rank-batch"):
        assert "32 examples" in facts["error"] and "batch_size=4" in facts["error"]
        assert facts["unchanged"] and facts["steps"] == 0


def test_a_rank_that_dies_stops_the_other_with_dpclips_error(ran):
    (facts,) = ran("dies", ranks=1)
    assert "could not agree on the step" in facts["error"] and "not applied" in facts["error"]
    assert facts["unchanged"] and facts["steps"] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs two CUDA devices")
def test_nccl_runs_the_same_scenarios(tmp_path):
    codes = _launch(tmp_path, "nccl")
    assert codes == [0, 0]
    ranks = [torch.load(tmp_path / f"update-ddp-{r}.pt", weights_only=False) for r in range(2)]
    assert _equal(ranks[0]["params"], ranks[1]["params"])
    expected, _ = _single_process_fixed(
        2, 5, lambda p: torch.optim.SGD(p, lr=0.5), loss_reduction="sum"
    )
    for got, want in zip(ranks[0]["params"], expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-6)


def test_data_parallel_is_refused_with_the_fix():
    model = nn.Linear(3, 2)
    wrapped = nn.DataParallel(model)
    with pytest.raises(ValueError, match="DataParallel.*use one process per GPU"):
        dpclip.PrivacyEngine(
            wrapped, torch.optim.SGD(model.parameters(), lr=0.1), sample_size=10, batch_size=2,
            steps=1, noise_multiplier=1.0,
        )  # fmt: skip
    assert model.weight.requires_grad and model.weight.grad is None


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0)])
def test_a_bad_shard_is_refused(shard):
    data = torch.utils.data.TensorDataset(torch.arange(4.0))
    with pytest.raises(ValueError, match="shard=\\(rank, world_size\\)"):
        PoissonLoader(data, sample_rate=0.5, shard=shard, shared_seed=lambda g: 0)


def test_a_shard_without_a_shared_seed_is_refused():
    data = torch.utils.data.TensorDataset(torch.arange(4.0))
    with pytest.raises(ValueError, match="shared_seed"):
        PoissonLoader(data, sample_rate=0.5, shard=(0, 2))


def test_a_process_group_started_after_the_engine_is_refused_at_the_step(monkeypatch):
    from dpclip import distributed

    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpclip.PrivacyEngine(
        model, optimizer, sample_size=10, batch_size=2, steps=1, noise_multiplier=1.0
    )
    before = model.weight.detach().clone()
    model(torch.randn(2, 3)).sum().backward()
    world = distributed.World(0, 2, torch.device("cpu"))
    monkeypatch.setattr(distributed.World, "detect", classmethod(lambda cls: world))
    with pytest.raises(dpclip.LoopOrderError, match="init_process_group before creating"):
        optimizer.step()
    assert torch.equal(model.weight, before) and engine.steps_taken == 0


@pytest.fixture
def one_process_group():
    """A gloo group of one process, torn down after the test."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_tensors_lent_to_c10d_are_kept_until_c10d_drops_them(one_process_group):
    """A collective's tensors outlive the caller's wait() in c10d's threads; freed there after
    their Python object, they abort the process at exit. dpclip keeps them until c10d lets go,
    and every collective of the World leaves nothing lent behind."""
    from dpclip import distributed

    distributed._LENT.clear()
    grads = [torch.ones(3), torch.full((2, 2), 2.0)]
    world = distributed.World(0, 2, torch.device("cpu"))  # a world of 2 only for its collectives
    world.all_reduce_(grads)
    assert world.from_rank_0(7) == 7
    world.broadcast_module(nn.Linear(2, 2))
    assert [g.tolist() for g in grads] == [[1.0] * 3, [[2.0, 2.0], [2.0, 2.0]]]
    distributed._wait_for_c10d()
    assert distributed._LENT == []

    total = torch.ones(4)
    work = torch.distributed.all_reduce(distributed._lend(total), async_op=True)
    work.wait()
    distributed._wait_for_c10d(timeout_s=0.05)  # the work handle still holds it: kept
    assert len(distributed._LENT) == 1 and distributed._LENT[0].data_ptr() == total.data_ptr()
    del work
    distributed._wait_for_c10d()
    assert distributed._LENT == []


@pytest.mark.parametrize("optimizer", ["sgd", "fused-adam"])
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank_like_one_process(ran, optimizer):
    """Rank 1's backward of step 1 overflows, rank 0's does not: both skip it (no noise, no
    ledger entry) and lower the scale alike; rank 1's share of step 2 is empty. The parameters
    equal one process's on the global batches, where step 1 overflows too."""
    ranks = ran(f"fp16-{optimizer}")
    model = worker.build_model().float()
    opt = worker.fp16_optimizer(optimizer, model.parameters())
    scaler = worker.fp16_scaler()
    engine = worker.engine_for(model, opt, loss_reduction="sum", grad_scaler=scaler)
    scales = worker.train_fp16(model, opt, scaler, rank=0, world=1)
    scale = worker.FP16_SCALE
    assert scales == [scale, scale / 2, scale / 2, scale / 2]  # step 1 was skipped
    assert engine.steps_taken == len(worker.FP16_BATCHES) - 1
    for rank in ranks:
        assert rank["scales"] == scales and rank["steps"] == engine.steps_taken
    assert _equal(ranks[0]["params"], ranks[1]["params"])  # bit-identical on both ranks
    for got, want in zip(ranks[0]["params"], worker.params_of(model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
