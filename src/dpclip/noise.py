"""Gaussian noise for the summed clipped gradient, drawn once per logical step."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import torch
from torch import Tensor


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
        """Add fresh noise to each tensor in place (one draw for the whole step)."""
        self.draws += 1
        if self.std == 0:
            return
        for t in tensors:
            noise = torch.empty_like(t).normal_(0.0, self.std, generator=self._generator(t.device))
            t.add_(noise)

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
