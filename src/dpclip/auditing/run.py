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
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from dpclip.auditing.bound import audit_scores, epsilon_lower_bound, guess_counts

CANARY_KINDS = ("dirac", "input")
MIN_CANARIES = 10
DIRAC_SCALE = 100.0  # canary gradient norm / max(R, 1): clipped to about R (see _canary_norm)


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
    ceiling: float  # the largest bound these canaries can show (every guess right)

    @property
    def verdict(self) -> str:
        """ "leak" (the bound exceeds the ledger's ε, or there is no noise and the bound is
        positive), "consistent", or "inconclusive" (the ledger's ε is at or above the ceiling,
        so no outcome of these canaries could contradict it)."""
        if self.epsilon_lower_bound > self.epsilon or (
            math.isinf(self.epsilon) and self.epsilon_lower_bound > 0
        ):
            return "leak"
        if self.epsilon >= self.ceiling:
            return "inconclusive"
        return "consistent"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an infinite ε (no noise) becomes None."""
        out = asdict(self)
        out["epsilon"] = self.epsilon if math.isfinite(self.epsilon) else None
        out["verdict"] = self.verdict
        return out

    def summary(self) -> str:
        eps = f"{self.epsilon:.3g}" if math.isfinite(self.epsilon) else "∞ (no noise)"
        verdict = {
            "leak": "LEAK: the run is less private than its ledger says"
            if math.isfinite(self.epsilon)
            else "leak detected: a run without noise is not private",
            "consistent": "consistent with the ledger",
            "inconclusive": f"inconclusive: {self.num_canaries} canaries can show at most "
            f"ε ≥ {self.ceiling:.2f}, below the ledger's ε (use more canaries)",
        }[self.verdict]
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

    ``train_set`` yields ``(x, label)`` pairs with integer class labels; ``loss_fn(outputs,
    labels)`` gives per-example losses (default: cross-entropy, ``reduction="none"``).
    ``optimizer(params)`` builds the optimizer over the parameters it is given (default: SGD at
    ``lr``). Pass exactly one of ``target_epsilon`` and ``noise_multiplier`` (0: no noise).
    ``engine_options`` go to :class:`dpclip.PrivacyEngine` (clipping, clip_norm, secure_rng...).
    The data set the engine sees is ``train_set`` plus one row per canary, so ``epochs`` are
    passes over both and the default δ is that of the larger set. ``progress`` is a tqdm-like
    callable wrapping the steps. The model is trained in place, and left detached and in its
    training mode even if the run fails.

    Dirac canaries audit dpclip's mechanism (per-example clipping, noise, sampling and the
    ledger) through a probe beside the model: they do not test the model's own layers (the
    engine's self-check does). Input canaries see the model, but show something only for weak
    privacy. One run's bound is loose: compare a seed's result with its ledger, never the best
    of several seeds (that would void the confidence).
    """
    from dpclip.accounting import get_epsilon
    from dpclip.engine import PrivacyEngine

    _check_arguments(canaries, num_canaries, target_epsilon, noise_multiplier, confidence, seed,
                     engine_options)  # fmt: skip
    if not (isinstance(epochs, numbers.Real) and 0 < epochs <= MAX_EPOCHS):
        raise AuditError(f"dpclip.audit: epochs must be in (0, {MAX_EPOCHS}], got {epochs}")
    xs, ys = _tensors(train_set, default_loss=loss_fn is None)
    inclusion_seed, sampling_seed, noise_seed = _seeds(seed)
    included = torch.rand(num_canaries, generator=_generator(inclusion_seed)) < 0.5
    data, n_real = _with_canaries(xs, ys, canaries, included, num_classes,
                                  _generator(inclusion_seed + 1))  # fmt: skip
    wrapped = _Audited(model, num_canaries if canaries == "dirac" else 0)
    opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=lr)))(wrapped.parameters())
    _check_optimizer(opt, wrapped)
    secure = bool(engine_options.get("secure_rng", False))
    engine = None
    try:
        engine = PrivacyEngine(
            wrapped, opt, sample_size=len(data), batch_size=batch_size, epochs=epochs,
            target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
            target_delta=target_delta, seed=None if secure else noise_seed, **engine_options,
        )  # fmt: skip
        if engine.privacy.clipping_style != "all-layer":
            raise AuditError(
                "dpclip.audit: audits all-layer clipping (the probe would be a clipping group "
                "of its own); pass clipping_style='all-layer'"
            )
        if engine.noise_multiplier > 0:  # the ledger of the whole plan, before any training
            get_epsilon(noise_multiplier=engine.noise_multiplier, sample_rate=engine.sample_rate,
                        steps=engine.planned_steps, delta=engine.target_delta)  # fmt: skip
    except (ValueError, OverflowError) as err:
        if engine is not None:
            engine.detach()
        if isinstance(err, AuditError):
            raise
        raise AuditError(f"dpclip.audit: cannot plan this run: {err}") from None
    scale = _canary_norm(engine.privacy.clipping, engine.privacy.clip_norm)
    was_training = model.training
    start = time.perf_counter()
    try:
        scores = _train(wrapped, opt, engine, data, included, canaries, loss_fn or _cross_entropy,
                        physical_batch_size, _generator(sampling_seed), progress, scale)  # fmt: skip
        if canaries == "input":
            cx, cy = data.tensors[0][n_real:], data.tensors[1][n_real:]
            scores = _input_scores(model, cx, cy, loss_fn or _cross_entropy)
    finally:
        engine.detach()
        model.train(was_training)
    bound = audit_scores(scores.tolist(), included.tolist(), engine.target_delta,
                         confidence=confidence)  # fmt: skip
    return AuditResult(
        canaries=canaries, num_canaries=num_canaries, included=int(included.sum()),
        guesses=bound.guesses, correct=bound.correct, epsilon=engine.epsilon(),
        delta=engine.target_delta, epsilon_lower_bound=bound.epsilon_lower_bound,
        confidence=confidence, noise_multiplier=engine.noise_multiplier,
        steps=engine.steps_taken, seconds=time.perf_counter() - start,
        ceiling=best_possible_bound(num_canaries, engine.target_delta, confidence),
    )  # fmt: skip


MAX_CANARIES = 100_000  # the Dirac probe's input is one-hot: batch × m values per physical batch
MAX_EPOCHS = 10_000  # planning calibrates σ over every step: beyond this it only hangs
MAX_NOISE_MULTIPLIER = 1e4  # beyond it no canary or gradient survives the noise: nothing to audit


def _check_arguments(kind, m, target_epsilon, sigma, confidence, seed, engine_options) -> None:
    """Every argument that training would otherwise trip over late, refused before it starts."""
    if kind not in CANARY_KINDS:
        raise AuditError(f"dpclip.audit: canaries must be one of {CANARY_KINDS}, got {kind!r}")
    if not isinstance(m, numbers.Integral) or isinstance(m, bool):
        raise AuditError(f"dpclip.audit: num_canaries must be an integer, got {m!r}")
    if not MIN_CANARIES <= m <= MAX_CANARIES:
        raise AuditError(
            f"dpclip.audit: need between {MIN_CANARIES} and {MAX_CANARIES} canaries, got {m}"
            + (" (fewer than 10 cannot give a bound)" if m < MIN_CANARIES else "")
        )
    if (target_epsilon is None) == (sigma is None):
        raise AuditError("dpclip.audit: pass exactly one of target_epsilon and noise_multiplier")
    if sigma is not None and not (
        isinstance(sigma, numbers.Real) and 0 <= sigma <= MAX_NOISE_MULTIPLIER
    ):
        raise AuditError(
            f"dpclip.audit: noise_multiplier must be in [0, {MAX_NOISE_MULTIPLIER:g}], got {sigma}"
        )
    if not (isinstance(confidence, numbers.Real) and 0.5 <= confidence < 1):
        raise AuditError(f"dpclip.audit: confidence must be in [0.5, 1), got {confidence}")
    if not (isinstance(seed, numbers.Integral) and 0 <= seed < 2**63):
        raise AuditError(f"dpclip.audit: seed must be an integer in [0, 2**63), got {seed!r}")
    if engine_options.get("secure_rng") and engine_options.get("seed") is not None:
        raise AuditError("dpclip.audit: secure_rng=True draws its own noise seeds; pass no seed")
    if "seed" in engine_options or "sample_size" in engine_options:
        raise AuditError("dpclip.audit: the audit sets the engine's seed and sample_size itself")


def _seeds(seed: int) -> tuple[int, int, int]:
    """Independent streams for the canaries' inclusion, the Poisson sampling and the noise: the
    theorem needs the mechanism's randomness independent of which canaries are in."""
    import numpy as np

    words = [s.generate_state(1, dtype=np.uint64)[0] for s in np.random.SeedSequence(seed).spawn(3)]
    return tuple(int(w) >> 2 for w in words)  # type: ignore[return-value]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _check_optimizer(opt: torch.optim.Optimizer, wrapped: _Audited) -> None:
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    if wrapped.probe is not None and id(wrapped.probe.weight) not in held:
        raise AuditError(
            "dpclip.audit: the optimizer must be built over the parameters optimizer(params) "
            "is given (they include the audit's probe), not over model.parameters()"
        )


def _canary_norm(clipping: str, clip_norm: float) -> float:
    """A Dirac canary's gradient norm, so that its clipped contribution is the most any example
    may give (about R): above R for functions that scale down to R, just under R for "global",
    which drops any example above R."""
    if clipping == "global":
        return clip_norm * (1 - 1e-6)
    return DIRAC_SCALE * max(clip_norm, 1.0)


def best_possible_bound(m: int, delta: float, confidence: float = 0.95) -> float:
    """The largest bound m canaries can show: every guess right, at the best guess count."""
    counts = guess_counts(m)
    each = 1.0 - (1.0 - confidence) / len(counts)
    return max(epsilon_lower_bound(m, k, k, delta, each) for k in counts)


def _tensors(train_set: Dataset, default_loss: bool) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of the whole set; labels must be one integer class index per example
    for the default loss (and always for input canaries, checked where they are made)."""
    try:
        if isinstance(train_set, TensorDataset) and len(train_set.tensors) == 2:
            xs, ys = train_set.tensors
        else:
            pairs = [train_set[i] for i in range(len(train_set))]  # type: ignore[arg-type]
            xs = torch.stack([torch.as_tensor(x) for x, _ in pairs])
            ys = torch.stack([torch.as_tensor(y) for _, y in pairs])
    except (TypeError, ValueError, RuntimeError) as err:
        raise AuditError(
            f"dpclip.audit: train_set must yield (input, label) pairs of same-shape tensors: "
            f"{str(err).splitlines()[0]}"
        ) from None
    if len(xs) != len(ys):
        raise AuditError(f"dpclip.audit: {len(xs)} inputs but {len(ys)} labels")
    if default_loss and (ys.dim() != 1 or ys.is_floating_point() or ys.dtype == torch.bool):
        raise AuditError(
            f"dpclip.audit: the default loss (cross-entropy) needs one integer class index per "
            f"example, got labels of shape {tuple(ys.shape)} and dtype {ys.dtype}; convert them "
            "(one-hot: labels.argmax(1)) or pass loss_fn"
        )
    return xs, ys


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
        if ys.dim() != 1 or ys.is_floating_point() or ys.dtype == torch.bool:
            raise AuditError(
                "dpclip.audit: input canaries relabel examples: they need one integer class "
                f"index per example, got labels of shape {tuple(ys.shape)} and dtype {ys.dtype}"
            )
        seen = int(ys.max()) + 1
        classes = num_classes if num_classes is not None else seen
        if int(ys.min()) < 0 or classes < seen:
            raise AuditError(
                f"dpclip.audit: num_classes={classes} but the labels run from {int(ys.min())} "
                f"to {seen - 1}"
            )
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


def _train(
    wrapped, opt, engine, data, included, kind, loss_fn, physical, gen, progress, scale
) -> Tensor:
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
                    loss = loss + scale * probe_out
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
