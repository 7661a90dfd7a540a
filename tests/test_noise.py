"""GaussianNoise on its own: std, independence across tensors and buckets, reproducibility."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from dpclip import noise as noise_module
from dpclip.noise import GaussianNoise
from tests.counting import count_draws


def _tensors() -> list[torch.Tensor]:
    return [
        torch.zeros(300, 100),
        torch.zeros(7, dtype=torch.float64),
        torch.zeros(50_000, dtype=torch.float64),
        torch.zeros(20, 30),
    ]


@pytest.mark.parametrize("bucket", [1 << 24, 1000])
def test_every_tensor_gets_its_own_noise_of_the_requested_std(monkeypatch, bucket):
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", bucket)
    tensors = _tensors()
    GaussianNoise(2.5, seed=0).add_(tensors)
    assert [t.dtype for t in tensors] == [t.dtype for t in _tensors()]
    for t in (tensors[0], tensors[2]):
        assert abs(t.std().item() / 2.5 - 1) < 0.02
    # no two tensors start with the same stretch of the draw
    flats = [t.flatten().double() for t in tensors]
    for i, x in enumerate(flats):
        for y in flats[i + 1 :]:
            n = min(x.numel(), y.numel())
            assert not torch.equal(x[:n], y[:n])


def test_buckets_keep_order_split_on_device_dtype_and_size(monkeypatch):
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 30_000)
    sizes = [[t.numel() for t in b] for b in noise_module._buckets(_tensors())]
    assert sizes == [[30_000], [7], [30_000], [20_000], [600]]  # the big tensor is cut in two
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 1 << 24)
    sizes = [[t.numel() for t in b] for b in noise_module._buckets(_tensors())]
    assert sizes == [[30_000], [7, 50_000], [600]]


def test_seeded_noise_is_reproducible_and_std_zero_adds_nothing():
    a, b = _tensors(), _tensors()
    GaussianNoise(1.0, seed=3).add_(a)
    GaussianNoise(1.0, seed=3).add_(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    zeros = _tensors()
    GaussianNoise(0.0, seed=3).add_(zeros)
    assert all(not t.any() for t in zeros)


def test_negative_std_is_refused():
    with pytest.raises(ValueError, match="expected noise std >= 0, got -1"):
        GaussianNoise(-1.0)


def test_bucketed_cpu_draw_has_the_std_and_does_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 4096)
    threads = torch.get_num_threads()
    draws = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            tensors = _tensors()
            GaussianNoise(2.5, seed=7).add_(tensors)
            draws.append(tensors)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(*draws, strict=True))
    big = draws[0][2]
    assert abs(big.std().item() / 2.5 - 1) < 0.02
    chunks = big.split(4096)
    assert not torch.equal(chunks[0], chunks[1])  # every bucket has a generator of its own


def test_bucketed_secure_draws_differ_between_engines(monkeypatch):
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 4096)
    a, b = _tensors(), _tensors()
    GaussianNoise(1.0, secure=True).add_(a)
    GaussianNoise(1.0, secure=True).add_(b)
    assert not torch.equal(a[2], b[2])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_draws_bucketed_noise_without_its_parents_threads(monkeypatch):
    # Tensors below torch's parallel grain (32768 elements): torch's own OpenMP pool is not
    # fork-safe either, which this test is not about.
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 4096)
    monkeypatch.setattr(noise_module, "_POOL_ELEMENTS", 0)
    GaussianNoise(1.0, seed=0).add_([torch.zeros(20_000)])  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # child: would hang on the parent's (thread-less) pool
        tensors = [torch.zeros(20_000)]
        GaussianNoise(1.0, seed=0).add_(tensors)
        os._exit(0 if tensors[0].std().item() > 0.9 else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the forked child hung drawing noise")


def test_non_contiguous_tensor_larger_than_a_bucket_gets_noise_everywhere_and_only_there(
    monkeypatch,
):
    """A strided view (a transposed grad) cannot be cut into flat pieces: it goes whole into a
    bucket of its own, still gets every element noised, and the storage around it is untouched."""
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 1000)
    base = torch.zeros(200, 60)
    view = base[:, :40].t()  # (40, 200), non-contiguous, 8000 elements > 1000
    assert not view.is_contiguous()
    small = torch.zeros(30)
    GaussianNoise(1.5, seed=0).add_([small, view])
    assert bool((view != 0).all()) and bool((small != 0).all())
    assert bool((base[:, 40:] == 0).all())  # the columns outside the view are untouched
    assert abs(view.std().item() / 1.5 - 1) < 0.05


def test_cpu_scratch_is_reused_but_every_draw_is_fresh_and_leaves_nothing_shared():
    noise = GaussianNoise(1.0, seed=0)
    draws = count_draws(noise)
    first, second = [torch.zeros(5000)], [torch.zeros(5000)]
    noise.add_(first)
    kept = first[0].clone()
    scratch = noise_module._scratch_buffer(1, torch.float32).data_ptr()
    noise.add_(second)
    assert noise_module._scratch_buffer(1, torch.float32).data_ptr() == scratch  # kept
    assert torch.equal(first[0], kept)  # the second draw did not write through the scratch
    assert not torch.equal(first[0], second[0])
    assert len(draws) == 2


def test_thread_pool_and_calling_thread_draw_the_same_noise(monkeypatch):
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 4096)
    threads = torch.get_num_threads()
    draws = []
    try:
        torch.set_num_threads(2)
        for pool_from in (1 << 40, 0):  # never, always
            monkeypatch.setattr(noise_module, "_POOL_ELEMENTS", pool_from)
            tensors = _tensors()
            noise = GaussianNoise(1.0, seed=11)
            noise.add_(tensors)
            noise.add_(tensors)  # a second step continues the same stream in both cases
            draws.append(tensors)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(*draws, strict=True))
    assert noise_module._pool.cache_info().currsize >= 1  # the pool did run


@pytest.mark.parametrize("bucket", [1 << 24, 1000])
def test_scaled_add_is_the_scaled_noisy_sum_in_one_draw(monkeypatch, bucket):
    """add_(ts, scale=s) gives s · (t + the noise the same seed adds at scale 1), strided views
    included, and the zero-std case still scales."""
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", bucket)

    def tensors() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(5)
        base = torch.randn(60, 50, generator=gen)
        small = torch.randn(7, dtype=torch.float64, generator=gen)
        return [torch.randn(300, 100, generator=gen), base.t(), small]

    plain, scaled = tensors(), tensors()
    GaussianNoise(2.0, seed=9).add_(plain)
    GaussianNoise(2.0, seed=9).add_(scaled, scale=0.125)
    for p, s in zip(plain, scaled, strict=True):
        torch.testing.assert_close(s, p * 0.125, rtol=1e-6, atol=1e-6)
    quiet = tensors()
    GaussianNoise(0.0, seed=9).add_(quiet, scale=0.125)
    assert all(torch.equal(q, t * 0.125) for q, t in zip(quiet, tensors(), strict=True))


@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf"), float("nan")])
def test_a_scale_that_is_not_finite_and_positive_is_refused_and_changes_nothing(scale):
    noise, tensors = GaussianNoise(1.0, seed=0), _tensors()
    state = noise.state_dict()
    with pytest.raises(ValueError, match="expected a finite noise scale > 0, got"):
        noise.add_(tensors, scale=scale)
    assert all(not t.any() for t in tensors)
    assert all(  # no random number was drawn
        torch.equal(g, state["generators"][k]) for k, g in noise.state_dict()["generators"].items()
    )


def test_kept_noise_views_never_repeat_a_draw_when_the_scratch_grows_or_layouts_change(
    monkeypatch,
):
    """The CPU scratch and its per-layout views are kept between steps, replaced when the
    scratch grows and dropped past a few layouts: whatever they went through, every step's
    noise is a fresh draw (a view left out of the draw would add the old noise again)."""
    monkeypatch.setattr(noise_module, "_PIECE_LAYOUTS", 2)
    noise = GaussianNoise(1.0, seed=3)

    def step(*shapes):
        tensors = [torch.zeros(s) for s in shapes]
        noise.add_(tensors)
        return torch.cat([t.reshape(-1) for t in tensors])

    first = step((3, 4), (5,))
    again = step((3, 4), (5,))  # the kept views, a new draw through them
    step((200_000,))  # a larger scratch: the old views go with the old buffer
    after_growth = step((3, 4), (5,))
    for shape in [(7,), (8,), (9,)]:  # more layouts than are kept
        step(shape)
    after_eviction = step((3, 4), (5,))
    draws = [first, again, after_growth, after_eviction]
    for i in range(len(draws)):
        assert bool((draws[i] != 0).all())
        for j in range(i):
            assert not torch.isclose(draws[i], draws[j]).any(), (i, j)


def test_seeded_cpu_noise_is_the_documented_stream(monkeypatch):
    """Bucket k's noise is normal_ from a generator seeded with the k-th 62-bit draw of the
    engine's CPU generator (seeded with ``seed``): the same numbers whether those draws are
    made one per bucket or all at once, so a seed gives the same noise across versions."""
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 4096)
    t = torch.zeros(3 * 4096)
    GaussianNoise(0.5, seed=11).add_([t])
    seeds = torch.randint(0, 2**62, (3,), generator=torch.Generator().manual_seed(11)).tolist()
    want = torch.cat([
        torch.empty(4096).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(s))
        for s in seeds
    ])  # fmt: skip
    assert torch.equal(t, want)


def test_secure_cpu_buckets_take_their_seeds_from_the_os(monkeypatch):
    monkeypatch.setitem(noise_module._BUCKET_ELEMENTS, "cpu", 4096)
    drawn = []
    real = noise_module.secrets.randbits
    monkeypatch.setattr(noise_module.secrets, "randbits", lambda k: drawn.append(k) or real(k))
    noise = GaussianNoise(1.0, secure=True)
    drawn.clear()  # the engine's own seed, drawn at construction
    t = torch.zeros(3 * 4096)
    noise.add_([t])
    assert drawn.count(62) >= 3  # one per bucket (and the generator's reseed)
    assert bool((t != 0).all())
