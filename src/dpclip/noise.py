"""Gaussian noise for the summed clipped gradient, drawn once per logical step."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import torch
from torch import Tensor


class GaussianNoise:
    """Adds N(0, std²) to tensors from its own generator.

    ``secure=True`` reseeds the generator from the OS's cryptographic randomness before every
    draw, so no seed or saved state can predict the noise; a seeded generator is for
    reproducible research only.
    """

    def __init__(self, std: float, *, seed: int | None = None, secure: bool = False) -> None:
        if std < 0:
            raise ValueError(f"expected noise std >= 0, got {std}")
        if secure and seed is not None:
            raise ValueError("secure noise cannot be seeded; pass seed=None with secure_rng=True")
        self.std = float(std)
        self.secure = secure
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.draws = 0

    def add_(self, tensors: Iterable[Tensor]) -> None:
        """Add fresh noise to each tensor in place (one draw for the whole step)."""
        if self.secure:
            self.generator.manual_seed(secrets.randbits(63))
        self.draws += 1
        if self.std == 0:
            return
        for t in tensors:
            noise = torch.randn(t.shape, generator=self.generator, dtype=t.dtype)
            t.add_(noise.to(t.device), alpha=self.std)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "generator": self.generator.get_state(), "secure": self.secure}

    def load_state_dict(self, state: dict) -> None:
        if state.get("secure") != self.secure:
            raise ValueError("noise state was saved with a different secure_rng setting")
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])
