"""``dpclip.audit``: one private training run with canaries, and the ε lower bound it shows.

Two kinds of canary, each put in the training set with probability 1/2:

- ``"dirac"`` (white-box, the strongest test of the mechanism itself): an extra probe layer with
  one weight per canary is added beside the model. Canary j's loss is a large multiple of probe
  weight j, so its gradient is a Dirac at coordinate j, and no real example has a gradient
  there. The auditor sees every noisy update of the probe and scores canary j by the sum of
  coordinate j over all steps: about R per step in which it was sampled if it is in, only noise
  if it is out.
- ``"input"`` (black-box): m examples held out of the user's data, each with a wrong label; an
  included canary is trained on like any example. The auditor sees only the final model and
  scores a canary by the log-likelihood the model gives its wrong label.

A canary that is out stays in the data set as a row whose gradient is zero, so the data set's
size and the sampling rate do not depend on which canaries are in. The guesses and the bound are
in :mod:`dpclip.auditing.bound`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from dpclip.auditing.bound import audit_scores

CANARY_KINDS = ("dirac", "input")
MIN_CANARIES = 10
DIRAC_SCALE = 100.0  # canary gradient norm: automatic clipping scales it to R·100/(100 + γ)


class AuditError(ValueError):
    """An audit that cannot run as asked (too few canaries, too little data, no plan)."""


@dataclass(frozen=True)
class AuditResult:
    """What one audited run showed. ``epsilon`` is the ledger's; a correct implementation has
    ``epsilon_lower_bound <= epsilon`` (with the stated confidence)."""

    canaries: str
    num_canaries: int
    included: int
    guesses: int
    correct: int
    epsilon: float
    delta: float
    epsilon_lower_bound: float
    confidence: float
    noise_multiplier: float
    steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an infinite ε (no noise) becomes None."""
        out = asdict(self)
        out["epsilon"] = self.epsilon if math.isfinite(self.epsilon) else None
        return out

    def summary(self) -> str:
        eps = f"{self.epsilon:.3g}" if math.isfinite(self.epsilon) else "∞ (no noise)"
        verdict = (
            "VIOLATION: the run leaked more than its ledger says"
            if self.epsilon_lower_bound > self.epsilon
            else "consistent with the ledger"
        )
        return (
            f"{self.canaries} canaries: {self.correct} of {self.guesses} guesses correct "
            f"({self.included} of {self.num_canaries} canaries in) -> ε ≥ "
            f"{self.epsilon_lower_bound:.3f} at {self.confidence:.0%} confidence; the ledger "
            f"says ε = {eps} at δ = {self.delta:g}, σ = {self.noise_multiplier:.4g}, "
            f"{self.steps} steps: {verdict}"
        )


class _Audited(nn.Module):
    """The user's model, and for Dirac canaries a probe with one weight per canary."""

    def __init__(self, model: nn.Module, num_probes: int) -> None:
        super().__init__()
        self.model = model
        self.probe = nn.Linear(num_probes, 1, bias=False) if num_probes else None
        if self.probe is not None:
            nn.init.zeros_(self.probe.weight)

    def forward(self, x: Tensor, probe_in: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        out = self.model(x)
        return out, (None if self.probe is None else self.probe(probe_in).squeeze(-1))


def audit(
    model: nn.Module,
    train_set: Dataset,
    *,
    canaries: str = "dirac",
    num_canaries: int = 1000,
    batch_size: int = 256,
    epochs: float = 30,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    target_delta: float | None = None,
    lr: float = 0.15,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    num_classes: int | None = None,
    physical_batch_size: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    progress: Callable[..., Any] | None = None,
    **engine_options: Any,
) -> AuditResult:
    """Train ``model`` privately on ``train_set`` with canaries; return the ε lower bound.

    ``train_set`` yields ``(x, label)`` pairs; ``loss_fn(outputs, labels)`` gives per-example
    losses (default: cross-entropy, ``reduction="none"``). ``optimizer(params)`` builds the
    optimizer (default: SGD at ``lr``). Pass exactly one of ``target_epsilon`` and
    ``noise_multiplier`` (0: no noise). ``engine_options`` go to :class:`dpclip.PrivacyEngine`
    (clipping, clip_norm, ...). ``progress`` is a tqdm-like callable wrapping the steps.
    The model is trained in place and left detached.
    """
    from dpclip.engine import PrivacyEngine

    if canaries not in CANARY_KINDS:
        raise AuditError(f"dpclip.audit: canaries must be one of {CANARY_KINDS}, got {canaries!r}")
    if not isinstance(num_canaries, int) or num_canaries < MIN_CANARIES:
        raise AuditError(
            f"dpclip.audit: need at least {MIN_CANARIES} canaries for a bound, got {num_canaries}"
        )
    if (target_epsilon is None) == (noise_multiplier is None):
        raise AuditError("dpclip.audit: pass exactly one of target_epsilon and noise_multiplier")
    xs, ys = _tensors(train_set)
    gen = torch.Generator().manual_seed(seed)
    included = torch.rand(num_canaries, generator=gen) < 0.5
    data, n_real = _with_canaries(xs, ys, canaries, included, num_classes, gen)
    wrapped = _Audited(model, num_canaries if canaries == "dirac" else 0)
    opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=lr)))(wrapped.parameters())
    try:
        engine = PrivacyEngine(
            wrapped, opt, sample_size=len(data), batch_size=batch_size, epochs=epochs,
            target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
            target_delta=target_delta, seed=seed, **engine_options,
        )  # fmt: skip
    except ValueError as err:
        raise AuditError(f"dpclip.audit: cannot plan this run: {err}") from None
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
    start = time.perf_counter()
    scores = _train(wrapped, opt, engine, data, included, canaries, loss_fn,
                    physical_batch_size, gen, progress)  # fmt: skip
    if canaries == "input":
        scores = _input_scores(model, data.tensors[0][n_real:], data.tensors[1][n_real:], loss_fn)
    engine.detach()
    bound = audit_scores(scores.tolist(), included.tolist(), engine.target_delta,
                         confidence=confidence)  # fmt: skip
    return AuditResult(
        canaries=canaries, num_canaries=num_canaries, included=int(included.sum()),
        guesses=bound.guesses, correct=bound.correct, epsilon=engine.epsilon(),
        delta=engine.target_delta, epsilon_lower_bound=bound.epsilon_lower_bound,
        confidence=confidence, noise_multiplier=engine.noise_multiplier,
        steps=engine.steps_taken, seconds=time.perf_counter() - start,
    )  # fmt: skip


def _tensors(train_set: Dataset) -> tuple[Tensor, Tensor]:
    if isinstance(train_set, TensorDataset) and len(train_set.tensors) == 2:
        return train_set.tensors[0], train_set.tensors[1]
    try:
        pairs = [train_set[i] for i in range(len(train_set))]  # type: ignore[arg-type]
        return torch.stack([torch.as_tensor(x) for x, _ in pairs]), torch.as_tensor(
            [int(y) for _, y in pairs]
        )
    except (TypeError, ValueError) as err:
        raise AuditError(
            f"dpclip.audit: train_set must yield (input, integer label) pairs: {err}"
        ) from None


def _with_canaries(
    xs: Tensor, ys: Tensor, kind: str, included: Tensor, num_classes: int | None, gen
) -> tuple[TensorDataset, int]:
    """The real examples, then one row per canary; ``ids`` is -1 for real rows, j for canary j."""
    m = included.numel()
    if kind == "dirac":
        if len(xs) < 1:
            raise AuditError("dpclip.audit: the data set is empty")
        # A canary row's input and label are placeholders: its model loss is masked out.
        cx, cy, real_x, real_y = xs[:1].expand(m, *xs.shape[1:]), ys[:1].expand(m), xs, ys
    else:
        if len(xs) < 2 * m:
            raise AuditError(
                f"dpclip.audit: {m} input canaries need at least {2 * m} examples (half of them "
                f"stay real training data); the data set has {len(xs)}. Pass fewer canaries"
            )
        classes = num_classes or int(ys.max()) + 1
        if classes < 2:
            raise AuditError("dpclip.audit: input canaries need at least 2 classes")
        held = torch.randperm(len(xs), generator=gen)
        real_x, real_y = xs[held[m:]], ys[held[m:]]
        cx, cy = xs[held[:m]], ys[held[:m]]
        shift = torch.randint(1, classes, (m,), generator=gen)
        cy = (cy + shift) % classes  # a label the example does not have
    ids = torch.cat([torch.full((len(real_x),), -1), torch.arange(m)])
    data = TensorDataset(torch.cat([real_x, cx.contiguous()]), torch.cat([real_y, cy]), ids)
    return data, len(real_x)


def _train(wrapped, opt, engine, data, included, kind, loss_fn, physical, gen, progress) -> Tensor:
    """The private training loop; for Dirac canaries, the sum of the probe's noisy updates."""
    m = included.numel()
    scores = torch.zeros(m, dtype=torch.float64)
    bar = progress(total=engine.planned_steps, desc=f"audit ({kind})") if progress else None
    loader = engine.data_loader(data, physical_batch_size=physical, generator=gen)
    wrapped.train()
    while engine.steps_taken < engine.planned_steps:
        for logical in loader:
            for x, y, ids in logical:
                is_canary = ids >= 0
                live = torch.zeros_like(is_canary)  # canary rows whose canary is in
                live[is_canary] = included[ids[is_canary]]
                trained = ~is_canary | live if kind == "input" else ~is_canary
                dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
                probe_in = None
                if kind == "dirac":
                    probe_in = F.one_hot(ids.clamp_min(0), m).to(dtype) * live.unsqueeze(1)
                out, probe_out = wrapped(x, probe_in)
                loss = trained.to(dtype) * loss_fn(out, y)  # a masked row's gradient is zero
                if probe_out is not None:
                    loss = loss + DIRAC_SCALE * probe_out
                loss.mean().backward()
            opt.step()
            if kind == "dirac":
                scores += wrapped.probe.weight.grad.detach()[0].double()
            opt.zero_grad()
            if bar is not None:
                bar.update(1)
            if engine.steps_taken >= engine.planned_steps:
                break
    if bar is not None:
        bar.close()
    return scores


@torch.no_grad()
def _input_scores(model: nn.Module, cx: Tensor, cy: Tensor, loss_fn) -> Tensor:
    """Higher for canaries the final model fits: minus the loss on the wrong label."""
    model.eval()
    return -loss_fn(model(cx), cy).double()
