"""Gaussian noise for the summed clipped gradient, drawn once per logical step."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import Tensor

_BUCKET_ELEMENTS = 1 << 24  # one flat draw covers at most this many elements (64 MB in float32)
# On a CPU, torch's normal_ runs one serial generator at ~8 ns per element: a second per step for
# GPT-2's 124M parameters. Larger draws are cut into chunks of this size, each from a generator
# seeded by the device generator, filled by as many threads as torch uses; the noise does not
# depend on the thread count.
_CPU_CHUNK_ELEMENTS = 1 << 21


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="dpclip-noise")


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive runs of one device and dtype, each of at most _BUCKET_ELEMENTS (or one tensor)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        last = buckets[-1][-1] if buckets else None
        same = last is not None and (last.device, last.dtype) == (t.device, t.dtype)
        if same and size + t.numel() <= _BUCKET_ELEMENTS:
            buckets[-1].append(t)
            size += t.numel()
        else:
            buckets.append([t])
            size = t.numel()
    return buckets


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
        self._scratch: dict[torch.dtype, Tensor] = {}
        self.draws = 0

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

    def add_(self, tensors: Iterable[Tensor]) -> None:
        """Add fresh noise to each tensor in place (one draw for the whole step).

        Tensors of one device and dtype share a flat draw of up to ``_BUCKET_ELEMENTS``: two
        kernel launches per bucket instead of two per parameter, which matters on a GPU.
        """
        self.draws += 1
        if self.std == 0:
            return
        for bucket in _buckets(list(tensors)):
            first = bucket[0]
            sizes = [t.numel() for t in bucket]
            flat = self._buffer(sum(sizes), first.dtype, first.device)
            self._fill(flat, self._generator(first.device))
            noise = [part.view_as(t) for part, t in zip(flat.split(sizes), bucket, strict=True)]
            torch._foreach_add_(bucket, noise)

    def _buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Scratch for one bucket's draw. Kept between steps on a CPU, where a fresh large
        allocation is page-faulted in again every step; GPUs have a caching allocator."""
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        buf = self._scratch.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self._scratch[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel]

    def _fill(self, flat: Tensor, gen: torch.Generator) -> None:
        """flat ~ N(0, std²): one draw, or on a CPU chunks drawn in parallel (see above)."""
        if flat.device.type != "cpu" or flat.numel() <= _CPU_CHUNK_ELEMENTS:
            flat.normal_(0.0, self.std, generator=gen)
            return
        chunks = flat.split(_CPU_CHUNK_ELEMENTS)
        seeds = torch.randint(0, 2**62, (len(chunks),), generator=gen).tolist()

        def fill(chunk: Tensor, seed: int) -> None:
            chunk.normal_(0.0, self.std, generator=torch.Generator().manual_seed(seed))

        threads = max(1, torch.get_num_threads())
        list(_pool(threads).map(fill, chunks, seeds))

    def state_dict(self) -> dict:
        return {
            "draws": self.draws,
            "seed": self.seed,
            "secure": self.secure,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("secure") != self.secure:
            raise ValueError("noise state was saved with a different secure_rng setting")
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self._generators = {}
        for key, gen_state in state["generators"].items():
            gen = torch.Generator(device=key)
            gen.set_state(gen_state)
            self._generators[key] = gen
