"""PrivacyEngine: makes an ordinary PyTorch training loop differentially private.

The engine composes the pieces: it records each supported layer's inputs and output gradients
(:mod:`dpclip.hooks`), turns them into clipped sums at the end of every backward pass
(:mod:`dpclip._bookkeeping`), and, through the optimizer's own step hooks, adds the noise once
per logical step, divides by the expected batch size and records the step in the ledger.
While attached, trainable parameters have ``requires_grad=False``: autograd computes only the
gradients flowing between layers, never the unclipped weight gradients. So a parameter used in
the forward outside the layers that own it would get no gradient from that use; the forward is
watched for that (:mod:`dpclip._param_guard`) and refuses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dpclip import _selfcheck, accounting, distributed
from dpclip._bookkeeping import Accumulator
from dpclip._first_batch import FirstBatch
from dpclip._grad_scaler import LossScaling
from dpclip._loss_tape import LossTape
from dpclip._param_guard import ParamUseGuard
from dpclip._plan import Plan, make_plan
from dpclip._selfcheck import CheckResult
from dpclip.accounting import sampling
from dpclip.config import PerformanceConfig, PrivacyConfig
from dpclip.errors import (
    IntegrityError,
    LoopOrderError,
    NonFiniteNormError,
    PhysicalBatchTooLarge,
    PrivacyBudgetExceeded,
    SampleRateError,
    SelfCheckError,
)
from dpclip.hooks import Record, Recorder, batch_of
from dpclip.layers import LayerRegistry, _derive, default_registry, fallback
from dpclip.layers._common import release_scratch
from dpclip.noise import GaussianNoise, release_buffers

_REGISTRY = default_registry()
_STATE_VERSION = 1
# the ledgers of engines that trained a model, by model: a new engine on it warns that its
# own ledger starts at 0 (the steps before stay spent)
_TRAINED: weakref.WeakKeyDictionary[nn.Module, list[accounting.PrivacyLedger]] = (
    weakref.WeakKeyDictionary()
)


def register_layer(
    module_type: type[nn.Module],
    *,
    outer_factors: Callable | None = None,
    per_sample_grad: Callable | None = None,
    check: Callable | None = None,
    replace: bool = False,
    **overrides: Callable,
) -> None:
    """Teach every new PrivacyEngine a rule for ``module_type``, in the form the built-ins use.

    Give exactly one form: ``outer_factors(module, inputs, grad_output, names)`` returning
    ``{name: OuterFactors(rows, cols)}`` with g_i = Σ_t rows_it ⊗ cols_it (the parameter viewed
    as dim 0 × the rest; a side may be token ids), or ``per_sample_grad(module, inputs,
    grad_output, names)`` returning ``{name: (b, *param.shape)}``. dpclip derives the norms
    (ghost or instantiated), the clipped sums and, from outer factors, the cross terms of tied
    weights. ``check(module)`` may return why an instance cannot be clipped; ``overrides``
    replace any derived slot of :class:`dpclip.layers.LayerRule` for speed. See
    :mod:`dpclip.layers` for the contract; the engine checks every shape a rule returns.
    """
    if (outer_factors is None) == (per_sample_grad is None):
        raise ValueError(
            "dpclip.register_layer: give exactly one of outer_factors= or per_sample_grad="
        )
    extra = {**overrides, "check": check}
    if outer_factors is not None:
        rule = _derive.from_outer_factors(_derive.checking(outer_factors), **extra)
    else:
        rule = _derive.from_per_sample(per_sample_grad, **extra)
    _REGISTRY.register(module_type, rule, replace=replace)


class PrivacyEngine:
    """Attach DP training with automatic clipping to ``model`` and ``optimizer``.

    Args:
        model: the model to train; every module with trainable parameters needs a layer rule.
        optimizer: any ``torch.optim.Optimizer`` over the model's trainable parameters (all of
            them: freeze the ones it should not train).
        sample_size: N, the number of training examples.
        batch_size: the expected logical batch size B; the update is divided by it.
        epochs, steps: the plan (exactly one); the ledger refuses steps beyond the budget.
        noise_multiplier, target_epsilon: σ, or the ε to calibrate σ for (exactly one).
        target_delta: δ; default :func:`dpclip.accounting.default_delta` (below 1/N).
        accountant: ``"pld"`` (default), ``"rdp"`` or ``"gdp"``.
        clipping, clip_norm, gamma: the clipping function, R and AUTO-S's γ.
        clipping_style: ``"all-layer"``, ``"layer-wise"``, ``"param-wise"`` or a list of groups.
        loss_reduction: ``"mean"`` if the loss is averaged over the physical batch, else ``"sum"``.
        norm_strategy: ``"ghost"``, ``"instantiate"`` or ``"mixed"`` (per layer, the cheaper).
        max_physical_batch_size: refuse backward passes over more samples than this.
        seed, secure_rng: the noise generator's seed, or OS randomness reseeded every step.
        privacy, performance: a :class:`dpclip.PrivacyConfig` / :class:`dpclip.PerformanceConfig`
            in place of their keywords (sample_size to loss_reduction; norm_strategy,
            max_physical_batch_size).
        verify: run the self-check (:meth:`verify`) on the first physical batch (of two
            examples or more) before its step: a few examples run alone must give the
            per-example gradient norms dpclip computes, or the step is refused. An int k also
            checks the first physical batch of every k-th step after it (a loss or model that
            mixes examples only on some batches: padding, a class missing from the first);
            each check costs about one to three steps. ``False`` turns it off.
        grad_scaler: the ``torch.amp.GradScaler`` of fp16 training. Its loss scale S multiplies
            every per-example gradient; dpclip clips the unscaled ones (automatic clipping's γ
            and Abadi's R would otherwise act at the wrong scale), and a step the scaler skips
            for overflow (``scaler.step(optimizer)``) costs nothing: no noise, no ledger entry.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        sample_size: int | None = None,
        batch_size: int | None = None,
        epochs: float | None = None,
        steps: int | None = None,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        accountant: str = "pld",
        clipping: str = "automatic",
        clip_norm: float = 1.0,
        gamma: float = 0.01,
        clipping_style: str | Sequence[Sequence[nn.Parameter | str]] = "all-layer",
        loss_reduction: str = "mean",
        norm_strategy: str = "mixed",
        max_physical_batch_size: int | None = None,
        seed: int | None = None,
        secure_rng: bool = False,
        verify: bool | int = True,
        registry: LayerRegistry | None = None,
        privacy: PrivacyConfig | None = None,
        performance: PerformanceConfig | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not isinstance(verify, (bool, int)) or (not isinstance(verify, bool) and verify < 1):
            raise ValueError(
                f"expected verify to be True, False or a period of steps >= 1, got {verify!r}"
            )
        privacy_kw = dict(
            sample_size=sample_size, batch_size=batch_size, epochs=epochs, steps=steps,
            noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
            target_delta=target_delta, accountant=accountant, clipping=clipping,
            clip_norm=clip_norm, gamma=gamma, clipping_style=clipping_style,
            loss_reduction=loss_reduction,
        )  # fmt: skip
        self.privacy = _config(PrivacyConfig, privacy, "privacy", privacy_kw)
        self.performance = _config(
            PerformanceConfig, performance, "performance",
            dict(norm_strategy=norm_strategy, max_physical_batch_size=max_physical_batch_size),
        )  # fmt: skip
        sample_size, accountant = self.privacy.sample_size, self.privacy.accountant
        model, self._ddp = distributed.unwrap(model)
        self._world = distributed.World.detect()
        self._scaling = LossScaling.of(grad_scaler, self._world)
        self.model, self.optimizer = model, _inner_optimizer(optimizer)
        self._plan = make_plan(
            model, optimizer, self.privacy, self.performance, registry or _REGISTRY
        )
        self._group_of = self._plan.group_index()
        self._params = [p for group in self._plan.groups for p in group]
        self._managed = {id(p) for p in self._params}

        self.sample_rate = self.privacy.sample_rate
        self.planned_steps = self.privacy.planned_steps
        self.steps_per_epoch = self.privacy.steps_per_epoch
        self.target_epsilon = self.privacy.target_epsilon
        self.target_delta = self.privacy.target_delta or accounting.default_delta(sample_size)
        self.noise_multiplier = self._calibrate()
        self.ledger = accounting.PrivacyLedger(accountant)
        if accountant == "gdp":
            warnings.warn(
                "dpclip: accountant='gdp' gives the central-limit approximation of ε, not an "
                "upper bound: it can be far below the true ε (a σ calibrated for ε=3 at q=0.01 "
                "and 100 steps is ε≈6.4 by PLD), and the budget check trusts it. Use 'pld' (the "
                "default) or 'rdp' for a guarantee",
                UserWarning,
                stacklevel=2,
            )
        self._noise = GaussianNoise(
            self.noise_multiplier * self.privacy.clip_norm, seed=seed, secure=secure_rng
        )
        self._budget_steps: int | None = None
        if self._world is not None:
            self._world.check_same(self._settings())
            if self._ddp is None:
                self._world.broadcast_module(self.model)

        self._micro_batches = 0
        self._examples_in_step = 0  # in this step's backward passes, on this rank
        self._sampled = (0, 0)  # (examples, steps) of the steps taken: Poisson at q?
        self._step_sample = (0, 0)
        self._few_warned = False
        self._empty_allowed = False
        self._poisoned: str | None = None
        self._unchecked: list[Tensor] = []  # finiteness of this step's norms, on the device
        self._rows_unchecked: list[tuple[Tensor, str]] = []  # see Recorder.row_checks
        self._overflowed = False  # a GradScaler's backward overflowed: its step will be skipped
        self._skipping = False  # the optimizer's own (fused) step skips this one for overflow
        self._stepping = False  # between the noise and the end of optimizer.step()
        self._physical_left = 0  # physical batches of the loader's logical batch still to come
        self._clipped_this_batch = False  # a backward added this physical batch's clipped sums
        self._clipped_forward: int | None = None  # the forward the last added sums came from
        self._sample_cut = False  # a physical batch of the loader's logical batch had no backward
        self._draws = 0  # logical batches engine.data_loader has begun (compared across ranks)
        self._draw_states: set[bytes] = set()  # digests of the random states drawn from
        self._step_draw: int | None = None  # the logical batch this step's sums come from
        self._lone_checks = 0  # self-checks that saw a batch of one example
        # an integration that Poisson-samples itself (DPTrainer) sets this: no loader warning
        self.samples_elsewhere = False
        self._sentinels: list[tuple[Tensor, weakref.ref, int]] = []  # .grads as dpclip left them
        self._spans_draws = False  # this step's sums come from two of the loader's samples
        # an integration's say on each backward (DPTrainer: only inside training_step)
        self._backward_gate: Callable[[], str | None] | None = None
        self._check_pending = bool(verify)
        self._check_every = None if isinstance(verify, bool) else int(verify)
        self._first = FirstBatch()  # its inputs and loss, until the first step checks them
        # BatchNorm without trainable parameters (affine=False, or frozen), InstanceNorm with
        # running statistics: no rule refuses them
        self._batch_statistics = [
            (path, m) for path, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats)
        ]  # fmt: skip
        self._sink: dict[nn.Parameter, Tensor] | None = None  # norms, while self-checking
        self._earlier = [ledger for ledger in _TRAINED.get(self.model, []) if ledger.steps]
        _TRAINED.setdefault(self.model, []).append(self.ledger)
        self._attach()

    def _warn_if_trained_before(self) -> None:
        """At the first step of a fresh ledger (not one loaded from a state)."""
        earlier, self._earlier = self._earlier, []
        if earlier:
            steps = sum(ledger.steps for ledger in earlier)
            eps = ", ".join(f"{ledger.epsilon(self.target_delta):.3g}" for ledger in earlier)
            warnings.warn(
                f"dpclip: this model was already trained by {len(earlier)} earlier "
                f"PrivacyEngine(s) ({steps} steps, ε={eps} at δ={self.target_delta:g}); this "
                "engine's ledger starts at 0, so on the same data the privacy spent is both "
                "together. To continue a run, give this engine the earlier one's state "
                "(engine.load_state_dict(old.state_dict()))",
                UserWarning,
                stacklevel=5,
            )

    # ----------------------------------------------------------------------------- wiring
    def _calibrate(self) -> float:
        if self.privacy.noise_multiplier is not None:
            return float(self.privacy.noise_multiplier)
        return accounting.get_noise_multiplier(
            target_epsilon=self.privacy.target_epsilon, delta=self.target_delta,
            sample_rate=self.sample_rate, steps=self.planned_steps,
            accountant=self.privacy.accountant,
        )  # fmt: skip

    def _settings(self) -> dict[str, Any]:
        """What every rank's engine must agree on (the ledger and the update depend on it)."""
        fields = ("sample_size", "batch_size", "clipping", "clip_norm", "gamma", "accountant",
                  "loss_reduction")  # fmt: skip
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {
            **{f: getattr(self.privacy, f) for f in fields},
            "planned steps": self.planned_steps,
            "noise_multiplier": self.noise_multiplier,
            "target_delta": self.target_delta,
            "clipping groups": [[names.get(id(p), "?") for p in g] for g in self._plan.groups],
            "parameter shapes": [tuple(p.shape) for p in self._params],
        }

    def _attach(self) -> None:
        self._restore = [(p, p.requires_grad) for p in self._params]
        self._unmute = distributed.mute(self._ddp)
        for p in self._params:
            p.requires_grad_(False)
            p.grad = None
        self._accumulator: Accumulator | None = None
        self._recorder = Recorder(self._on_grad, self._on_backward_end)
        whole = [m for m, rule in self._plan.rules.items() if rule.whole_call]
        managed = {id(p) for p in self._params}
        frozen = [p for p in self.model.parameters() if id(p) not in managed]
        self._recorder.attach(self._plan.rules, root=self.model, whole_call=whole, frozen=frozen)
        self._param_names = {id(p): n for n, p in self.model.named_parameters()}
        owners: dict[nn.Parameter, list[nn.Module]] = {}
        for module, own in self._plan.names.items():
            for n in own:
                owners.setdefault(self._plan.params[module][n], []).append(module)
        names = {p: self._param_names[id(p)] for p in self._params}
        unruled: dict[nn.Parameter, list[str]] = {}
        for path, module in self.model.named_modules():
            if module not in self._plan.rules:
                for p in module.parameters(recurse=False):
                    if id(p) in self._managed:
                        unruled.setdefault(p, []).append(f"{path} ({type(module).__name__})")
        self._guard = ParamUseGuard(owners, names, unruled, recorder=self._recorder)
        self._guard.attach(self._plan.rules, root=self.model)
        if self._plan.fallback:
            print(_fallback_line(self._plan), file=sys.stderr)
        self._hooks = [
            self.model.register_forward_pre_hook(self._forward_begins),
            self.model.register_forward_hook(self._forward_ends, with_kwargs=True),
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
            _watch_other_optimizers(self),
        ]
        if self._scaling is not None:
            device = self._params[0].device if self._params else torch.device("cpu")
            self._hooks.append(self._scaling.attach(self.optimizer, device, self._skipped_step))
        self.attached = True

    def detach(self) -> None:
        """Return model and optimizer to ordinary, non-private training."""
        if not self.attached:
            return
        if self._micro_batches:  # clipped sums that never got their noise
            for p in self._params:
                p.grad = None
            warnings.warn(
                "dpclip: detach() dropped the clipped gradients of a step that was not taken "
                "(without their noise they are not private); the parameters' .grad is None",
                UserWarning,
                stacklevel=2,
            )
            self._micro_batches = 0
        self._recorder.detach()
        self._guard.detach()
        self._first.clear()
        for handle in self._hooks:
            handle.remove()
        for p, flag in self._restore:
            p.requires_grad_(flag)
        self._unmute()
        release_scratch()  # the buffers kept between steps: the layer rules' and the noise's
        release_buffers()
        self.attached = False

    def __enter__(self) -> PrivacyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ----------------------------------------------------------------------------- backward
    def _on_grad(self, record: Record) -> None:
        if self._stepping:
            self._stepping = False  # this step is abandoned: its gradients are not used
            raise LoopOrderError(
                "a backward pass ran inside optimizer.step() (a closure, as LBFGS calls one), "
                "after dpclip had added the noise: its clipped gradients would replace the noisy "
                "ones. Optimizers that evaluate the loss inside step are not supported; run the "
                "backward before optimizer.step() and call it without a closure"
            )
        if self._accumulator is None and self._sink is not None:
            self._accumulator = Accumulator(self._plan, self._group_of)
        elif self._accumulator is None:
            batch = record.batch
            limit = self.performance.max_physical_batch_size
            if limit is not None and batch > limit:
                raise PhysicalBatchTooLarge(
                    f"physical batch of {batch} samples exceeds max_physical_batch_size={limit}; "
                    "split the logical batch (engine.data_loader(..., physical_batch_size=...))"
                )
            if self._overflowed and self._grads_cleared():  # the scaler skipped that step
                self._micro_batches, self._overflowed, self._empty_allowed = 0, False, False
                self._examples_in_step = 0
            if self._micro_batches == 0:
                self._check_fresh_grads()
                self._examples_in_step = 0
            self._accumulator = Accumulator(self._plan, self._group_of, self._loss_scale())
        try:
            if self._plan.rules[record.module].whole_call:  # it runs the module again
                with self._rules_running():
                    self._accumulator.add(record)
            else:
                self._accumulator.add(record)
        except BaseException:
            self._accumulator = None
            raise

    def _on_backward_end(self) -> None:
        accumulator, self._accumulator = self._accumulator, None
        if accumulator is None:
            return
        if self._sink is not None:
            self._sink.update(accumulator.norms_sq())
            return
        if self._backward_gate is not None and (refusal := self._backward_gate()):
            raise LoopOrderError(refusal + "; its gradients were not added")
        if self._recorder.expected is not None and accumulator.batch:  # a loader's batch
            if self._clipped_this_batch:
                raise LoopOrderError(
                    "a second backward pass over the same physical batch of engine.data_loader: "
                    "its examples would be clipped twice and both sums added (each could move "
                    "the step by 2R while the noise is for R). Compute every loss of a batch "
                    "(views, heads, terms) in one backward: (loss_a + loss_b).backward(); the "
                    "gradients of this backward were not added"
                )
            self._clipped_this_batch = True
        if accumulator.forward is not None and accumulator.forward == self._clipped_forward:
            raise LoopOrderError(
                "a second backward pass over the same forward (loss_a.backward(retain_graph="
                "True), then loss_b.backward()): each would clip every example of the batch on "
                "its own and both sums be added (√2·R per example, or 2R, while the noise is "
                "for R). Sum the losses into one backward: (loss_a + loss_b).backward(); the "
                "gradients of this backward were not added"
            )
        try:
            sums = accumulator.finish()
        except NonFiniteNormError as err:
            if accumulator.loss_scale is None:
                self._poisoned = str(err)
                self._first.stale = True  # a NaN batch is not the self-check's: the next is
                raise
            # fp16 overflow: NaN gradients make scaler.step skip the step, as without dpclip
            sums = {p: torch.full_like(p, float("nan")) for p in self._params}
            self._overflowed = True
        if accumulator.finite is not None:  # an accelerator's backward: read at the step
            self._unchecked.append(accumulator.finite)
        self._clipped_forward = accumulator.forward
        if self._micro_batches and self._sums_dropped():  # zero_grad() since the last backward
            self._examples_in_step = 0
            self._rows_unchecked = []  # those sums' checks went with them
            if self._recorder.expected is not None:  # inside a logical batch of the loader
                self._sample_cut = True
        self._rows_unchecked += self._recorder.row_checks
        for p, g in sums.items():
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g.to(p.dtype))
        if sums:  # first, middle and last: zero_grad of only some layers shows too
            held = list(sums)
            picks = {id(q): q for q in (held[0], held[len(held) // 2], held[-1])}.values()
            self._sentinels = [(q, weakref.ref(q.grad), q.grad._version) for q in picks]
        self._micro_batches += 1
        self._examples_in_step += accumulator.batch

    def _sums_dropped(self) -> bool:
        """Whether the clipped sums added so far were dropped or overwritten since (a few
        parameters' gradients as dpclip left them: replaced, set to None or zeroed in place)."""
        return any(
            p.grad is None or p.grad is not grad() or p.grad._version != version
            for p, grad, version in self._sentinels
        )

    def _loss_scale(self) -> Tensor | None:
        return None if self._scaling is None else self._scaling.scale()

    def _skipped_step(self) -> None:
        """The scaler skips this step for overflow (on some rank): it ends here, as a step
        taken would (the next backward must find the gradients zeroed; the scaler's own check
        would skip every step after it otherwise)."""
        self._overflowed = True
        self._micro_batches, self._examples_in_step = 0, 0

    def _grads_cleared(self) -> bool:
        return all(p.grad is None or not bool(p.grad.any()) for p in self._params)

    def _check_fresh_grads(self) -> None:
        for p in self._params:
            if p.grad is not None and bool(p.grad.any()):
                raise LoopOrderError(
                    "gradients from before the last optimizer.step() are still there; call "
                    "optimizer.zero_grad() after each step"
                )
        self._poisoned = None

    # ----------------------------------------------------------------------------- step
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._skipping = False  # left set by a skipped step whose optimizer raised
        unscaled = None  # an optimizer whose loss-scaled sums the scaler must have unscaled
        fused = None  # a fused optimizer stepped by the scaler: its sums are unscaled here
        if self._scaling is not None:
            fused = self._scaling.fused_step(optimizer)
            if fused:  # an overflow the fused step will skip: no noise, no ledger entry
                self._skipping = True
                return
            if fused is None:  # not fused: the scaler must have unscaled the sums by now
                unscaled = optimizer
        world = self._world
        if world is None:
            self._may_step(unscaled)
            examples = self._examples_in_step
        else:  # every rank steps, or none does
            try:
                self._may_step(unscaled)
            except BaseException as err:
                world.agree(f"{type(err).__name__}: {err}", self.ledger.steps, self._draws)
                raise
            examples = world.agree(None, self.ledger.steps, self._draws, self._examples_in_step)
        self._check_sample_rate(examples)  # the same on every rank: all refuse, or none
        self._stepping = True
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._params]
        if fused is False:
            LossScaling.unscale_fused(optimizer, grads)
        scale = 1.0 / self.privacy.batch_size
        if world is None:  # the noise and the division by B in one pass over the gradients
            self._noise.add_(grads, scale=scale)
            return
        if world.rank == 0:  # the noise once per step over the world: rank 0 alone draws it
            self._noise.add_(grads)
        world.all_reduce_(grads)
        torch._foreach_mul_(grads, scale)

    def _drop_step(self) -> None:
        """A step refused for what its sums hold: it ends here, and the next backward starts a
        new one from cleared gradients (its batches cannot be the self-check's: the next is)."""
        self._micro_batches, self._examples_in_step = 0, 0
        self._first.clear()

    def _other_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Refuse another optimizer's step on a parameter this engine manages: its .grad
        holds clipped sums without their noise until this engine's optimizer steps."""
        if optimizer is self.optimizer or not self._micro_batches:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._managed and p.grad is not None:
                    raise LoopOrderError(
                        f"{type(optimizer).__name__}.step() on a parameter this PrivacyEngine "
                        "manages, from an optimizer that is not the engine's: its gradient is "
                        "the clipped sum without noise until the engine's optimizer steps, so "
                        "this update would not be private. Give the engine the optimizer that "
                        "steps these parameters (one optimizer, with param groups)"
                    )

    def _may_step(self, unscaled: torch.optim.Optimizer | None = None) -> None:
        """Refuse the step (before anything changes) if it would not be private or allowed;
        ``unscaled``: an optimizer whose sums the GradScaler must have unscaled by now."""
        if self._world is None and distributed.World.detect() is not None:
            raise LoopOrderError(
                "torch.distributed was initialised after this PrivacyEngine was built: every "
                "process would add its own noise and none would sum the clipped gradients. Call "
                "dist.init_process_group before creating the engine"
            )
        if self._unchecked:  # one device sync per logical step, for all its backward passes
            flags, self._unchecked = self._unchecked, []
            if not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
                self._poisoned = (
                    "a per-sample gradient norm of this step was NaN or infinite (check the "
                    "loss for NaN/inf); its clipped gradients hold NaN: call "
                    "optimizer.zero_grad() and go on with the next batch"
                )
        if self._rows_unchecked:  # read with the same device sync
            checks, self._rows_unchecked = self._rows_unchecked, []
            alike = torch.stack([c.to(checks[0][0].device) for c, _ in checks]).tolist()
            differ = next(
                (what for ok, (_, what) in zip(alike, checks, strict=True) if not ok), None
            )
            if differ is not None:
                self._drop_step()
                raise IntegrityError(
                    f"refusing to step: {differ}, and B rows of it, which differ, met the batch "
                    "row by row: example b got row b, so what each example computes depends "
                    "on its place in the batch (and on the batch's size), and one example "
                    "added or removed changes the others' gradients, beyond what the clipping "
                    "bounds. Broadcast one row to every example instead (p[None], or a table "
                    "without the batch's rows); call optimizer.zero_grad() to drop this step"
                )
        if self._poisoned is not None:
            self._drop_step()
            raise NonFiniteNormError(f"refusing to step: {self._poisoned}")
        if self._overflowed and self._grads_cleared():  # skipped, and zero_grad() since
            self._micro_batches, self._overflowed, self._examples_in_step = 0, False, 0
        if self._overflowed:
            raise NonFiniteNormError(
                "refusing to step: the loss-scaled backward overflowed; step through the "
                "scaler (scaler.step(optimizer)), which skips this step"
            )
        if unscaled is not None and self._scaling is not None:
            self._scaling.check_unscaled(unscaled)
        if self._spans_draws:
            raise LoopOrderError(
                "optimizer.step() over two logical batches of engine.data_loader (the last one's "
                "clipped gradients were not stepped or dropped before the next began): one step "
                "over two Poisson samples counts examples drawn in both twice, and the ledger "
                "one step. Call optimizer.step() once per logical batch (with Accelerate, "
                "gradient_accumulation_steps=1: the loader's physical batches are the "
                "accumulation); call optimizer.zero_grad() to drop these"
            )
        if self._sample_cut:
            raise LoopOrderError(
                "optimizer.step() after a logical batch of engine.data_loader whose physical "
                "batches did not all get a backward (a break, a batch skipped, "
                "optimizer.zero_grad() between them, which drops the ones before, or batches "
                "taken ahead of their backward, as list(logical_batch) does): the examples "
                "left out depend on which others were sampled, so the step's sample is not the "
                "Poisson sample the ledger counts. Run every physical batch of the logical "
                "batch, then step; call optimizer.zero_grad() to drop this one"
            )
        if self._physical_left:
            raise LoopOrderError(
                f"optimizer.step() was called with {self._physical_left} physical batch(es) of "
                "this logical batch still to come from engine.data_loader: each step must see "
                "its whole Poisson sample (one noisy step per logical batch, as the ledger "
                "counts). Accumulate the physical batches and step once after the inner loop: "
                "for x, y in logical_batch: loss(x, y).backward(); then optimizer.step()"
            )
        self._check_no_foreign_grads()  # first: an unfrozen parameter also hides the backward
        if self._micro_batches == 0 and not self._empty_allowed:
            side = self._recorder.side_pass
            raise LoopOrderError(
                "optimizer.step() was called without a backward pass since the last step; "
                "dpclip takes exactly one noisy step per logical batch"
                + (
                    ". A backward did run, but as one that writes no .grad (torch.autograd.grad, "
                    "backward(inputs=...)), or from a tensor made to require grad inside the "
                    "forward rather than from the model's inputs (PEFT's "
                    "enable_input_require_grads: call model.disable_input_require_grads())"
                    if side
                    else ""
                )
            )
        if self._micro_batches == 0:  # an empty logical batch: the step is the noise alone,
            self._check_fresh_grads()  # not the last step's gradient again
        if self._earlier and not self.ledger.steps:
            self._warn_if_trained_before()
        allowed = self._allowed_steps()
        if self.ledger.steps + 1 > allowed:
            raise PrivacyBudgetExceeded(
                f"step {self.ledger.steps + 1} would exceed the privacy budget "
                f"({self._budget_text()}, {allowed} steps); the parameters are unchanged. "
                "What was spent stays spent: a new PrivacyEngine's ledger would start at 0, "
                "and the two runs' ε add up on the same data. Plan the whole run's budget "
                "(epochs or steps) from the start."
            )
        if self._check_pending and self._examples_in_step:  # none: nothing to check yet
            self._check_first_batch()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepping = False
        self._step_draw = None
        self._recorder.side_pass = False
        self._sample_cut = self._spans_draws = False
        if self._skipping:
            self._skipping = self._overflowed = False
        else:
            self.ledger.record(self.noise_multiplier, self.sample_rate, 1)
            self._sampled = self._step_sample
            if self._check_every and self.ledger.steps % self._check_every == 0:
                self._check_pending = True  # the next step's first physical batch
        self._micro_batches = 0
        self._examples_in_step = 0
        self._empty_allowed = False

    def _check_sample_rate(self, examples: int) -> None:
        """Refuse a step that, with the run's steps before it, holds far more examples than
        Poisson sampling at q gives (the loop's own loader with larger batches than
        ``batch_size``, or a per-rank batch declared as the global one): the ledger would
        charge q and the true rate is higher."""
        if not self._draws and not self.samples_elsewhere and not self._sampled[1]:
            warnings.warn(
                "dpclip: the ε reported assumes each step's examples are a Poisson sample at "
                f"q={self.sample_rate:.3g} (batch_size / sample_size); this loop's batches do "
                "not come from engine.data_loader. A shuffled loader of fixed-size batches "
                "(DataLoader(shuffle=True), DistributedSampler) is not Poisson sampling, and "
                "its true ε can be larger; iterate engine.data_loader(...) for the guarantee",
                UserWarning,
                stacklevel=4,
            )
        count, steps = self._sampled[0] + examples, self._sampled[1] + 1
        trials, q = steps * self.privacy.sample_size, self.sample_rate
        if sampling.too_many(count, trials, q):
            raise SampleRateError(
                f"refusing to step: this run's {steps} step(s) held {count} examples, "
                f"{count / steps:.1f} per step, where batch_size={self.privacy.batch_size} of "
                f"sample_size={self.privacy.sample_size} (Poisson sampling at q={q:.3g}) gives "
                f"{self.privacy.batch_size} on average; the chance of so many is below "
                f"{sampling.IMPLAUSIBLE:g}. The ledger would charge q while the loop samples at "
                "a higher rate, so its ε would be too small. Give the engine the logical batch "
                "your loop uses (over all processes) as batch_size, or iterate "
                "engine.data_loader(...); the step was not taken"
            )
        if not self._few_warned and sampling.too_few(count, trials, q):
            self._few_warned = True
            warnings.warn(
                f"dpclip: this run's {steps} step(s) held {count / steps:.1f} examples per step, "
                f"far fewer than batch_size={self.privacy.batch_size}: the update is divided by "
                "batch_size and the ε charged is for that rate (more than this loop spends). "
                "Give the engine the logical batch your loop uses, or use engine.data_loader",
                UserWarning,
                stacklevel=4,
            )
        self._step_sample = (count, steps)

    # ----------------------------------------------------------------------------- self-check
    def verify(self, *args: Any, loss_fn: Callable[[Any], Tensor], **kwargs: Any) -> CheckResult:
        """Check now that dpclip clips true examples of a batch; raise if it does not.

        ``model(*args, **kwargs)`` is run (batch on dim 0) and ``loss_fn(output)`` is the loss;
        then a few examples are run alone through ordinary autograd and each parameter's
        per-example gradient norm is compared with dpclip's (dropout off on both sides). Raises
        :class:`dpclip.SelfCheckError` naming the parameter and the likely causes if they differ.
        Releases nothing and changes nothing (model, gradients, optimizer, RNG, ledger). When it
        passes, the automatic check of the first physical batch is not needed any more.
        """
        with _selfcheck.unchanged(self.model), self._hooks_off():
            output = self.model(*args, **kwargs)
            source = batch_of(args, kwargs)
            tape = LossTape(output, None if source is None else int(source.shape[0]))
            with tape:
                loss = loss_fn(output)
            tape.set_root(loss)
            del loss, output
        if not tape.captured:
            raise SelfCheckError(f"dpclip cannot check this loss: {tape.problem}")
        if tape.mixing is not None:
            raise SelfCheckError(tape.mixing)
        result = self._run_check(args, kwargs, tape)
        self._check_pending = False
        self._first.clear()
        return result

    def _forward_begins(self, module: nn.Module, args: tuple) -> None:
        if self._recorder.is_paused:
            return
        if self._batch_statistics and self._recorder.enabled and torch.is_grad_enabled():
            self._refuse_batch_statistics()
        self._first.forward_begins(grad=torch.is_grad_enabled())
        if not self._recorder.in_backward:
            self._accumulator = None  # a backward abandoned by an error: start afresh

    def _refuse_batch_statistics(self) -> None:
        """A BatchNorm in training mode normalizes each example with the batch's statistics (the
        examples' outputs, and so their gradients, depend on each other) and writes them into
        its running buffers, private data without noise."""
        for path, m in self._batch_statistics:
            if not m.training:
                continue
            if isinstance(m, nn.modules.instancenorm._InstanceNorm):
                why = (
                    " with track_running_stats=True: it records the batch's statistics in its "
                    "running buffers, private data without noise. Build it with "
                    "track_running_stats=False (each example is normalized by its own "
                    "statistics either way)"
                )
            else:
                why = (
                    ": it normalizes with the batch's statistics, so each example's gradient "
                    "depends on the others, and records them in its running buffers without "
                    "noise. Replace it with GroupNorm (dpclip.fix(model), before creating the "
                    "optimizer)"
                )
            raise IntegrityError(
                f"{path} ({type(m).__name__}) is in training mode{why}, or keep it in eval mode "
                f"with frozen statistics (model.get_submodule({path!r}).eval() after each "
                "model.train())"
            )

    def _forward_ends(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The first physical batch: keep its inputs and record its loss (a training forward
        only: not the self-check's own, nor verify's, which run with the recorder off)."""
        if self._recorder.is_paused:
            return
        recording = self._recorder.enabled and self._sink is None
        empty = self._recorder.batch == 0  # no example to check: the next batch is the first
        if self._check_pending and recording and torch.is_grad_enabled() and not empty:
            self._first.forward_ends(args, kwargs, output, self._recorder.batch)

    def _check_first_batch(self) -> None:
        args, kwargs, tape = self._first.get()
        result = self._run_check(args, kwargs, tape)
        # a batch of one cannot show examples mixing: the next is checked too, up to 3 times
        # (with physical batches of one example every check would see one)
        self._lone_checks += len(result.examples) < 2
        self._check_pending = len(result.examples) < 2 and self._lone_checks < 3
        self._first.clear()

    def _run_check(self, args: tuple, kwargs: dict, tape: LossTape) -> CheckResult:
        subject = _selfcheck.Subject(
            self.model, self._params, self._param_names, self._hooks_off, self._norms_sq,
            mean_reduction=self.privacy.loss_reduction == "mean",
        )  # fmt: skip
        expected, self._recorder.expected = self._recorder.expected, None
        self._sink = {}
        self._recorder.every_pass = True  # its norms come from autograd.grad passes
        try:
            return _selfcheck.check(subject, args, kwargs, tape)
        finally:
            self._sink, self._accumulator = None, None
            self._recorder.expected = expected
            self._recorder.every_pass = False

    def _norms_sq(self, loss: Tensor) -> dict[nn.Parameter, Tensor]:
        """dpclip's per-example squared norms for ``loss``; no ``.grad`` is written anywhere
        (autograd.grad to every leaf the loss reaches runs every path the records are on)."""
        assert self._sink is not None
        self._sink.clear()
        leaves = _selfcheck.graph_leaves(loss)
        if leaves:
            torch.autograd.grad(loss, leaves, allow_unused=True)
        return dict(self._sink)

    @contextlib.contextmanager
    def _rules_running(self) -> Iterator[None]:
        """Layer rules may run a module's forward again (the fallback): nothing records it."""
        guard, self._guard.enabled = self._guard.enabled, False
        try:
            with self._recorder.paused():
                yield
        finally:
            self._guard.enabled = guard

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        """Ordinary autograd: no recording, no forward guard, managed parameters trainable."""
        self._recorder.enabled = self._guard.enabled = False
        for p in self._params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in self._params:
                p.requires_grad_(False)
            self._recorder.enabled = self._guard.enabled = True

    def _check_no_foreign_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._managed:
                    if p.requires_grad:
                        raise LoopOrderError(
                            "a parameter managed by dpclip has requires_grad=True again; its "
                            "gradient would not be clipped. Do not re-enable it while attached"
                        )
                elif p.grad is not None:
                    raise LoopOrderError(
                        f"a parameter of shape {tuple(p.shape)} in the optimizer has a gradient "
                        "dpclip did not clip; refusing a non-private update"
                    )

    def _allowed_steps(self) -> int:
        if self.target_epsilon is None or self.noise_multiplier == 0:
            return self.planned_steps
        if self.ledger.steps < self.planned_steps:
            return self.planned_steps
        if self._budget_steps is None:
            self._budget_steps = self.ledger.steps + self.ledger.steps_within_budget(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                target_epsilon=self.target_epsilon, delta=self.target_delta,
            )  # fmt: skip
        return max(self.planned_steps, self._budget_steps)

    def _budget_text(self) -> str:
        if self.target_epsilon is None:
            return f"σ={self.noise_multiplier:.4g} planned for {self.planned_steps} steps"
        return f"ε={self.target_epsilon:g}, δ={self.target_delta:g}"

    # ----------------------------------------------------------------------------- reporting
    @property
    def steps_taken(self) -> int:
        return self.ledger.steps

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent by the steps taken so far, at ``delta`` (default: the target δ)."""
        if self.ledger.steps == 0:
            return 0.0
        return self.ledger.epsilon(self.target_delta if delta is None else delta)

    def privacy_spent(self) -> tuple[float, float]:
        """(ε, δ) spent so far at the target δ."""
        return self.epsilon(), self.target_delta

    def data_loader(
        self,
        dataset: Any,
        *,
        physical_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
    ) -> Any:
        """Poisson-sampled logical batches at rate q, each split into physical batches.

        Under torch.distributed every rank iterates its own loader: rank 0's ``generator`` (or
        torch's global generator) seeds the sample of each pass, shared by all ranks, and each
        rank takes every world-size-th example of it, so the union is one Poisson sample.
        """
        from dpclip.data import PoissonLoader

        world = self._world
        if len(dataset) != self.privacy.sample_size:
            raise ValueError(
                f"dataset has {len(dataset)} examples but the engine was built for "
                f"sample_size={self.privacy.sample_size}"
            )
        return PoissonLoader(
            dataset, sample_rate=self.sample_rate, physical_batch_size=physical_batch_size,
            generator=generator, collate_fn=collate_fn, num_workers=num_workers,
            on_logical_batch=self._drawn, on_physical_batch=self._expect_batch,
            shard=None if world is None else (world.rank, world.size),
            shared_seed=None if world is None else world.shared_seed,
        )  # fmt: skip

    def _drawn(self, logical: Any) -> None:
        """engine.data_loader drew ``logical``: number it, and refuse a draw from a random
        state drawn from before (the same Poisson sample again, which the ledger would count
        as a new one)."""
        if logical.state in self._draw_states:
            raise LoopOrderError(
                "engine.data_loader drew from a random state it had drawn from before: a "
                "generator seeded again (torch.Generator().manual_seed(s) passed anew each "
                "epoch, or torch.manual_seed in the loop) replays the same Poisson samples, "
                "each of which the ledger would charge as a new one. Create the generator "
                "once, before the loop, and pass that same one each time"
            )
        self._draw_states.add(logical.state)
        self._begin_logical_batch(len(logical))
        logical.draw = self._draws

    def _begin_logical_batch(self, size: int, drawn: bool = True) -> None:
        """A logical batch of ``size`` examples (this rank's share) begins; ``drawn``: by
        engine.data_loader, whose draws the ranks compare (an integration that samples itself
        calls this for an empty share only, on that rank alone)."""
        # the last logical batch's clipped sums still wait for a step: refused at that step
        # (raising here would end the loader's iteration)
        self._spans_draws = bool(self._micro_batches) and not self._grads_cleared()
        if not self._spans_draws:
            self._micro_batches = 0
        self._draws += drawn
        self._empty_allowed = size == 0
        self._sample_cut = False
        if size == 0:
            self._empty_share_ahead()

    def _empty_share_ahead(self) -> None:
        """An empty share of a logical batch is coming: its step is the noise alone. It has no
        loss to scale, and a GradScaler makes its scale at its first ``scale()``: a first share
        that is empty gets it here, before ``scaler.step`` asks for it."""
        if self._scaling is not None:
            self._scaling.before_empty_batch()

    def _expect_batch(self, logical: Any, size: int | None, after: int) -> None:
        """The loader's physical batch of ``logical``: the model's next forwards must have this
        batch, and ``after`` more physical batches of this logical batch come before its step
        (or, with ``size`` None, the loop over them ended with ``after`` never taken)."""
        if (
            size is not None
            and self._micro_batches
            and logical.draw != self._step_draw
            and not self._sums_dropped()
        ):
            raise LoopOrderError(
                "a physical batch of another logical batch of engine.data_loader joins a step "
                "that holds clipped sums of an earlier one (zip of two loaders, both run before "
                "one step): one step would sum two Poisson samples, counting examples in both "
                "twice, while the ledger charges one. Run one logical batch's physical batches, "
                "step, then the next's"
            )
        if size is not None:
            self._step_draw = logical.draw
        if size is not None and logical.iterations > 1:
            raise LoopOrderError(
                "a logical batch of engine.data_loader iterated a second time (two passes or "
                "views, each with its own backward, or a second step on it): each example "
                "would be clipped and added twice (2R while the noise is for R), or used by "
                "two steps the ledger charges as two Poisson samples. Compute every view's "
                "loss in one backward per physical batch, and step once per logical batch"
            )
        if self._recorder.expected is not None and not self._clipped_this_batch:
            self._sample_cut = True  # the previous physical batch got no backward
        if size is None and after:
            self._sample_cut = True  # a break out of the loop over the physical batches
        self._recorder.expected = size
        self._physical_left = after if size is not None else 0
        self._clipped_this_batch = False

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The ledger and the noise generator, for resuming with the same ε."""
        return {
            "version": _STATE_VERSION,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "ledger": self.ledger.state_dict(),
            "noise": self._noise.state_dict(),
            "draw_states": sorted(self._draw_states),  # a resumed run may not draw them again
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved ledger and noise state; the settings must match this engine's."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a dpclip PrivacyEngine state_dict (or from another version)")
        if self.ledger.steps:
            raise ValueError(
                f"this engine has taken {self.ledger.steps} step(s): loading a state would drop "
                "them from its ledger while the model keeps them. Load the state into a new "
                "PrivacyEngine (with the model restored from the same checkpoint)"
            )
        saved = (
            state.get("ledger", {}).get("accountant")
            if isinstance(state.get("ledger"), dict)
            else None
        )
        if saved != self.ledger.accountant:
            raise ValueError(
                f"the state was saved by an engine with accountant={saved!r}; this one uses "
                f"{self.ledger.accountant!r}, whose ε and budget would silently change. Build "
                f"the engine with accountant={saved!r} to resume"
            )
        for key in ("noise_multiplier", "sample_rate"):
            if abs(float(state[key]) - getattr(self, key)) > 1e-12 * max(1.0, getattr(self, key)):
                raise ValueError(
                    f"saved {key}={state[key]} differs from this engine's {getattr(self, key)}"
                )
        drawn = state.get("draw_states", [])
        if not isinstance(drawn, list) or not all(
            isinstance(d, bytes) and len(d) == 16 for d in drawn
        ):
            raise ValueError("the state's draw_states are not a list of 16-byte digests")
        self.ledger.load_state_dict(state["ledger"])
        self._noise.load_state_dict(state["noise"])
        self._draw_states.update(drawn)
        self._budget_steps = None


_ATTACHED: weakref.WeakSet[PrivacyEngine] = weakref.WeakSet()  # seen by the hook below
_GLOBAL_HOOK: list[Any] = []  # its handle, once registered


def _watch_other_optimizers(engine: PrivacyEngine) -> Any:
    """Let ``engine`` see every optimizer's step (one global pre-hook for all engines, which
    holds them weakly: an engine dropped without detach() is collected as before). Returns the
    handle that stops it watching."""
    _ATTACHED.add(engine)
    if not _GLOBAL_HOOK:
        _GLOBAL_HOOK.append(register_optimizer_step_pre_hook(_every_optimizer_step))
    return _Unwatch(weakref.ref(engine))


def _every_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    for engine in list(_ATTACHED):
        engine._other_optimizer_step(optimizer, args, kwargs)


@dataclasses.dataclass(frozen=True)
class _Unwatch:
    engine: weakref.ref

    def remove(self) -> None:
        engine = self.engine()
        if engine is not None:
            _ATTACHED.discard(engine)


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper that never ran ``Optimizer.__init__`` (Accelerate's
    AcceleratedOptimizer): its step hooks are the ones that run when the wrapper steps."""
    inner = getattr(optimizer, "optimizer", None)
    while "_optimizer_step_pre_hooks" not in vars(optimizer) and isinstance(
        inner, torch.optim.Optimizer
    ):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"expected optimizer to be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    return optimizer


def _config(kind: type, given: Any, name: str, keywords: dict[str, Any]) -> Any:
    """The config object passed as ``name=``, or one built (and validated) from the keywords;
    passing both is refused rather than letting one silently win."""
    if given is None:
        if keywords.get("sample_size") is None and kind is PrivacyConfig:
            raise ValueError("pass sample_size= and batch_size= (or privacy=PrivacyConfig(...))")
        return kind(**keywords)
    if not isinstance(given, kind):
        raise ValueError(f"expected {name}= to be a {kind.__name__}, got {type(given).__name__}")
    defaults = inspect.signature(PrivacyEngine.__init__).parameters  # the keywords' own
    clash = sorted(k for k, v in keywords.items() if not _is_default(v, defaults[k].default))
    if clash:
        raise ValueError(
            f"pass either {name}={kind.__name__}(...) or its keywords, not both: {clash}"
        )
    return given


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (not isinstance(value, (list, tuple)) and value == default)


def _fallback_line(plan: Plan) -> str:
    """One line naming the modules on the generic fallback and what it holds per example."""
    modules = [m for m, rule in plan.rules.items() if rule.whole_call]
    per_example = sum(fallback.per_example_bytes(m, plan.names[m]) for m in modules)
    shown = ", ".join(plan.fallback[:4]) + (
        f" and {len(modules) - 4} more" if len(modules) > 4 else ""
    )
    return (
        f"dpclip: {len(modules)} module(s) without a layer rule take the generic per-example "
        f"fallback (torch.func; {_size(per_example)} per example in the physical batch): {shown}"
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
