"""Gaussian noise for the summed clipped gradient, drawn once per logical step."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import Tensor

from dpclip._buckets import buckets

# A bucket is one flat draw, added to a run of tensors (or pieces of one) of one device and dtype:
# two kernel launches per bucket instead of two per parameter, which matters on a GPU.
_BUCKET_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
# On a CPU torch's normal_ is one serial generator, ~4 ns per element. Every CPU bucket is drawn
# from a generator of its own, seeded in bucket order from the engine's, into a per-thread scratch
# kept between steps (a fresh buffer would be faulted in again every step): the noise does not
# depend on which thread draws a bucket. Above _POOL_ELEMENTS per step, threads (as many as torch
# uses) draw the buckets, in about half the time on 2 cores (166 M: 0.40-0.53 s, 0.74-1.18 s
# serial). Below it the calling thread does: per process, the pool cost GPT-like (6 M) and
# ViT-small (22 M) more step time than it saved (benchmarks/RESULTS.md, "The noise").
_POOL_ELEMENTS = 1 << 26
# CPU tensors below this many elements get the noise in two multi-tensor calls (a second pass over
# them costs less than a dispatched op each); larger ones in one fused pass each.
_SMALL = 1 << 16
_scratch = threading.local()


@lru_cache(maxsize=4)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """A pool per thread count and process: a forked child must not reuse its parent's pool,
    whose threads do not exist in the child."""
    return ThreadPoolExecutor(threads, thread_name_prefix="dpclip-noise")


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Runs of one device and dtype of at most the device's bucket size (larger contiguous
    tensors cut into flat pieces first)."""
    return buckets(tensors, lambda t: _BUCKET_ELEMENTS.get(t.device.type, _BUCKET_ELEMENTS["cuda"]))


def _scratch_buffer(numel: int, dtype: torch.dtype) -> Tensor:
    """This thread's CPU scratch, kept between steps."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
        _scratch.__dict__.pop("pieces", None)  # views of the old buffer: drop them with it
    return buf[:numel]


def release_buffers() -> None:
    """Drop this thread's noise scratch and its views (the engine calls it when it detaches)."""
    _scratch.__dict__.clear()


_PIECE_LAYOUTS = 16  # bucket layouts whose views are kept per thread (a model has a few)


def _scratch_pieces(bucket: list[Tensor], numel: int) -> tuple[Tensor, list[Tensor]]:
    """This thread's scratch for ``bucket``: flat, and one view shaped like each tensor.

    The views are kept with the scratch, per layout (dtype and shapes): making them is a
    dispatched op per tensor, each step, for views of the same memory.
    """
    key = (bucket[0].dtype, tuple(t.shape for t in bucket))
    got = _scratch.__dict__.get("pieces", {}).get(key)  # views of the current buffer only
    if got is None:
        flat = _scratch_buffer(numel, bucket[0].dtype)  # a new buffer drops the old views
        layouts = _scratch.__dict__.setdefault("pieces", {})
        if len(layouts) >= _PIECE_LAYOUTS:
            layouts.clear()
        got = layouts[key] = (flat, _split_like(flat, bucket))
    return got


def _split_like(flat: Tensor, bucket: list[Tensor]) -> list[Tensor]:
    """``flat`` cut into consecutive views shaped like the tensors of ``bucket``."""
    pieces = flat.split([t.numel() for t in bucket])
    return [n.view_as(t) for n, t in zip(pieces, bucket, strict=True)]


def _add_scaled(bucket: list[Tensor], pieces: list[Tensor], scale: float) -> None:
    """t <- scale · t + n for each tensor t of the bucket and its piece n of the noise."""
    if bucket[0].device.type == "cpu":  # one pass per large tensor: noise + scale · t, into t
        small_t, small_n = [], []
        for t, n in zip(bucket, pieces, strict=True):
            if t.numel() >= _SMALL:
                torch.add(n, t, alpha=scale, out=t)
            else:
                small_t.append(t)
                small_n.append(n)
        if small_t:  # biases and norm affines: two calls for all of them instead of one each
            if scale != 1.0:
                torch._foreach_mul_(small_t, scale)
            torch._foreach_add_(small_t, small_n)
        return
    if scale != 1.0:
        torch._foreach_mul_(bucket, scale)
    torch._foreach_add_(bucket, pieces)


class GaussianNoise:
    """Adds N(0, std²) to tensors, from generators of its own (one per device, drawn in place).

    ``secure=True`` reseeds from the OS's cryptographic randomness before every draw, so no
    seed or saved state predicts the noise; a seeded generator is for reproducible research.
    """

    def __init__(self, std: float, *, seed: int | None = None, secure: bool = False) -> None:
        if std < 0:
            raise ValueError(f"expected noise std >= 0, got {std}")
        if secure and seed is not None:
            raise ValueError("secure noise cannot be seeded; pass seed=None with secure_rng=True")
        self.std = float(std)
        self.secure = secure
        self.seed = seed if seed is not None else secrets.randbits(62)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + len(self._generators))
            self._generators[key] = gen
        if self.secure:
            gen.manual_seed(secrets.randbits(62))
        return gen

    def add_(self, tensors: Iterable[Tensor], *, scale: float = 1.0) -> None:
        """t <- scale · (t + N(0, std²)) for each tensor, in place (one draw for the whole step).

        ``scale`` folds a division of the noisy sum (by the batch size) into the same pass.
        """
        if not 0 < scale < float("inf"):
            raise ValueError(f"expected a finite noise scale > 0, got {scale}")
        tensors = list(tensors)
        if self.std == 0:
            if scale != 1.0:
                torch._foreach_mul_(tensors, scale)
            return
        std = self.std * scale
        cpu_buckets: list[list[Tensor]] = []
        cpu_gen = None
        for bucket in _buckets(tensors):
            first = bucket[0]
            if first.device.type == "cpu":
                if cpu_gen is None:  # made where the first CPU bucket is (generators by order)
                    cpu_gen = self._generator(first.device)
                cpu_buckets.append(bucket)
                continue
            gen = self._generator(first.device)
            flat = torch.empty(sum(t.numel() for t in bucket), dtype=first.dtype,
                               device=first.device)  # fmt: skip
            _add_scaled(bucket, _split_like(flat.normal_(0.0, std, generator=gen), bucket), scale)
        if not cpu_buckets:
            return
        # each CPU bucket's seed: from the OS when secure, else one draw for all of them from the
        # engine's generator (the same numbers as one draw per bucket: one host read, not one each)
        seeds = (
            [secrets.randbits(62) for _ in cpu_buckets]
            if self.secure
            else torch.randint(0, 2**62, (len(cpu_buckets),), generator=cpu_gen).tolist()
        )
        cpu_jobs = [
            (bucket, sum(t.numel() for t in bucket), seed, std, scale)
            for bucket, seed in zip(cpu_buckets, seeds, strict=True)
        ]
        threads = torch.get_num_threads()
        if threads > 1 and sum(job[1] for job in cpu_jobs) >= _POOL_ELEMENTS:
            list(_pool(threads, os.getpid()).map(self._add_cpu, cpu_jobs))
        else:
            for job in cpu_jobs:
                self._add_cpu(job)

    def _add_cpu(self, job: tuple[list[Tensor], int, int, float, float]) -> None:
        bucket, numel, seed, std, scale = job
        flat, pieces = _scratch_pieces(bucket, numel)
        flat.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        _add_scaled(bucket, pieces, scale)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "secure": self.secure,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("secure") != self.secure:
            raise ValueError("noise state was saved with a different secure_rng setting")
        self.seed = int(state["seed"])  # a "draws" count in older states is not needed
        self._generators = {}
        for key, gen_state in state["generators"].items():
            gen = torch.Generator(device=key)
            gen.set_state(gen_state)
            self._generators[key] = gen
