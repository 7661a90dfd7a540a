"""DP fine-tuning through Hugging Face's ``Trainer``: :class:`DPTrainer` and :class:`PrivacyArguments`.

``DPTrainer`` is a ``transformers.Trainer`` whose training loop is made private by a
:class:`dpclip.PrivacyEngine`: the train set is Poisson-sampled at rate q = B / N with
B = per_device_train_batch_size × gradient_accumulation_steps × world size, each rank's share
split into ``gradient_accumulation_steps`` physical batches; every example's gradient is clipped
(automatic clipping by default) and the noise is added once per optimizer step. ε is logged with
the loss, checkpoints carry the ledger, and settings that would break the guarantee are refused.

The engine is attached before the first training step and detached when ``train()`` returns,
so code that counts or filters trainable parameters by ``requires_grad`` before or after
training (PEFT's ``print_trainable_parameters``, the Trainer's count and optimizer creation)
sees them as trainable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as err:  # pragma: no cover
    raise ImportError(
        "dpclip.integrations.transformers needs transformers: pip install 'dpclip[hf]'"
    ) from err

from dpclip import accounting, distributed
from dpclip.config import PrivacyConfig
from dpclip.data import poisson_sample
from dpclip.engine import PrivacyEngine, _inner_optimizer
from dpclip.errors import LoopOrderError, UnsupportedModuleError
from dpclip.validate import find_unsupported

__all__ = ["DPTrainer", "PoissonBatchSampler", "PrivacyArguments"]

_ITERABLE = (
    "DPTrainer: the train set must be a map-style dataset with a length (N): Poisson sampling "
    "and the privacy accounting need N"
)
STATE_FILE = "dpclip_state.pt"  # in checkpoints only: the ledger, noise and sampling state
ARGS_FILE = "dpclip_privacy_args.json"  # beside the model whenever it is saved (no seeds)


@dataclass
class PrivacyArguments:
    """The privacy settings of a :class:`DPTrainer` run; validated on creation, saved with it.

    Exactly one of ``target_epsilon`` (σ is calibrated for the run's plan) and
    ``noise_multiplier``. ``target_delta`` defaults to dpclip's (below 1/N). ``noise_seed`` and
    ``sampling_seed`` make a run reproducible, for research only: by default both come from the
    OS's randomness (saved in checkpoints for resuming), because a known seed reveals the noise
    or which examples each step used. ``secure_rng`` reseeds the noise from the OS every step.
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    target_delta: float | None = None
    clipping: str = "automatic"
    clip_norm: float = 1.0
    gamma: float = 0.01
    clipping_style: str = "all-layer"
    accountant: str = "pld"
    noise_seed: int | None = None
    sampling_seed: int | None = None
    secure_rng: bool = False

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "PrivacyArguments: give exactly one of target_epsilon= and noise_multiplier="
            )
        if not isinstance(self.clipping_style, str):
            raise ValueError(
                "PrivacyArguments: clipping_style must be a name (all-layer, layer-wise, "
                f"param-wise), got {self.clipping_style!r}"
            )
        for name in ("noise_seed", "sampling_seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"PrivacyArguments: expected {name} to be an int, got {value!r}")
        if self.secure_rng and self.noise_seed is not None:
            raise ValueError("PrivacyArguments: secure_rng=True cannot take a noise_seed")
        try:  # the other checks are the engine's own
            PrivacyConfig(sample_size=2, batch_size=1, steps=1, **self.engine_settings())
        except ValueError as err:
            raise ValueError(f"PrivacyArguments: {err}") from None

    def engine_settings(self) -> dict[str, Any]:
        """The keywords these arguments give :class:`dpclip.PrivacyEngine`."""
        skip = {"noise_seed", "sampling_seed", "secure_rng"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson-sampled logical batches, each as ``accumulation`` consecutive physical batches.

    Every example is in a logical batch independently with probability q; a logical batch is
    split into ``accumulation`` parts of nearly equal size, some possibly empty (the Trainer
    steps after each ``accumulation`` batches). With ``shard=(rank, world_size)`` every rank
    draws the same sample (the seed must be the same) and keeps every world_size-th example, so
    the union of the ranks' batches is one Poisson sample. A pass yields ``steps_per_epoch(q)`` logical
    batches; pass ``e`` draws from a generator seeded by (seed, e), so a resumed run replays
    its epoch exactly (``set_epoch``, which the Trainer calls; without it passes count up).
    """

    def __init__(
        self, size: int, sample_rate: float, accumulation: int, seed: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:  # fmt: skip
        self.size, self.sample_rate, self.accumulation = size, sample_rate, accumulation
        self.seed, self.epoch, self.shard = seed, 0, shard
        self.steps = accounting.steps_per_epoch(sample_rate)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        for _ in range(self.steps):  # the same sample on every rank; each takes its share
            sampled = poisson_sample(self.size, self.sample_rate, generator, self.shard)
            for part in torch.tensor_split(sampled, self.accumulation):
                yield part.tolist()


class _Empty(dict):
    """The batch of an empty physical batch: the training step skips it."""


def _collating(collate: Callable[[list], Any]) -> Callable[[list], Any]:
    def collate_fn(features: list) -> Any:
        return _Empty() if not features else collate(features)

    return collate_fn


class _StepBegins(TrainerCallback):
    """A logical batch begins (the Trainer's own event for it): the engine is attached before
    the first one, even if it is empty (a noise-only step is a step), and its examples counted."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._check_loader(kwargs.get("train_dataloader"))
        self.trainer._attach(self.trainer.model_wrapped)
        self.trainer._examples_in_step = self.trainer._batches_in_step = 0


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with differential privacy (automatic clipping).

    Use it as the Trainer, with ``privacy_args=PrivacyArguments(...)``; ``trainer.privacy_engine``
    is the :class:`dpclip.PrivacyEngine` once training has started (``.epsilon()``). What
    changes: the sampler (Poisson, at the logical batch), the loss of causal-LM, masked-LM,
    token-classification and encoder-decoder models (each example's mean over its own tokens,
    with ``label_smoothing_factor``, then the mean over the batch: the models' own token mean
    mixes examples when sequences are padded or masked; a ``compute_loss_func`` of yours is
    used as given, and must average each example's own loss), and
    ``max_grad_norm``, which clips the noisy update (post-processing) instead of the raw
    gradient. The logged ``grad_norm`` is the noisy update's norm.
    """

    def __init__(self, *args: Any, privacy_args: PrivacyArguments, **kwargs: Any) -> None:
        if not isinstance(privacy_args, PrivacyArguments):
            raise ValueError(
                f"DPTrainer: expected privacy_args to be a PrivacyArguments, got "
                f"{type(privacy_args).__name__}"
            )
        data = kwargs.get("train_dataset")
        if data is not None and (isinstance(data, IterableDataset) or not hasattr(data, "__len__")):
            raise ValueError(_ITERABLE)
        super().__init__(*args, **kwargs)
        self.privacy_args = privacy_args
        self.privacy_engine: PrivacyEngine | None = None
        self._refuse_settings()
        problems = find_unsupported(self.model)
        if problems:
            raise UnsupportedModuleError(problems)
        self.model_accepts_loss_kwargs = False  # the loss is ours: a mean over examples
        self._token_loss = _token_loss_kind(self.model)
        self._examples_in_step = 0
        self._batches_in_step = 0  # training steps of this logical batch, empty ones included
        self._last_inputs: Any = None
        self._in_backward = False
        self._grad_norm: Tensor | None = None
        self._resume_state: dict | None = None
        self._sampling_seed = privacy_args.sampling_seed
        if self._sampling_seed is None:
            self._sampling_seed = secrets.randbits(62)
        self._handles: list[Any] = []
        self._sampler: PoissonBatchSampler | None = None
        self.add_callback(_StepBegins(self))

    # ------------------------------------------------------------------------ refusals
    def _refuse_settings(self) -> None:
        args, problems = self.args, []
        strategy = getattr(args, "train_sampling_strategy", "random")
        if getattr(args, "group_by_length", False) or strategy not in (None, "random"):
            problems.append(
                f"train_sampling_strategy={strategy!r} (or group_by_length) is not Poisson "
                "sampling; DPTrainer samples the train set itself: leave the default"
            )
        if self.train_dataset is None or isinstance(self.train_dataset, IterableDataset):
            problems.append(_ITERABLE.removeprefix("DPTrainer: "))
        if getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing:
            problems.append("gradient_checkpointing is not supported: turn it off")
        if args.auto_find_batch_size:
            problems.append(
                "auto_find_batch_size would change the batch the privacy is planned for"
            )
        if args.ignore_data_skip:
            problems.append(
                "ignore_data_skip: a resumed epoch would draw its first Poisson samples again, "
                "which the ledger counts as new ones"
            )
        if args.n_gpu > 1:
            problems.append(
                "DataParallel over several GPUs in one process is not supported: launch one "
                "process per GPU (torchrun or accelerate launch)"
            )
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            problems.append("DeepSpeed and FSDP (sharded parameters) are not supported")
        config = getattr(args, "accelerator_config", None)
        if getattr(config, "dispatch_batches", None) or getattr(config, "split_batches", None):
            problems.append(
                "accelerator_config dispatch_batches / split_batches: rank 0 would deal out "
                "batches of several draws, not each rank's share of one Poisson sample; leave "
                "them unset"
            )
        if getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False, None):
            problems.append(
                "include_num_input_tokens_seen logs the tokens of every step, which tells "
                "each Poisson sample's size without noise; turn it off"
            )
        if problems:
            raise ValueError("DPTrainer: " + "; ".join(problems))

    # ------------------------------------------------------------------------ data
    def logical_batch_size(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def get_train_dataloader(self) -> DataLoader:
        """Poisson-sampled logical batches at q = B / N, as gradient-accumulation batches."""
        dataset = self.train_dataset
        size = len(dataset)
        batch = self.logical_batch_size()
        if not 1 <= batch <= size:
            raise ValueError(
                f"DPTrainer: the logical batch ({batch}) must be between 1 and the train set's "
                f"size ({size})"
            )
        collate = self.data_collator
        try:
            import datasets

            is_hf = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover
            is_hf = False
        if is_hf:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        shard, seed = (0, 1), self._sampling_seed
        world = distributed.World.detect()
        if world is not None:  # rank 0's seed, so every rank draws the same sample
            seed = self._sampling_seed = world.from_rank_0(seed)
            shard = (world.rank, world.size)
        sampler = PoissonBatchSampler(
            size, batch / size, self.args.gradient_accumulation_steps, seed, shard
        )
        loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=_collating(collate),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )  # fmt: skip
        self._sampler = sampler
        loader = self.accelerator.prepare(loader)
        shard = getattr(loader, "batch_sampler", None)  # accelerate's wrapper: a passthrough
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def _check_loader(self, loader: Any) -> None:
        """The training loop's loader must be the one :meth:`get_train_dataloader` built: a
        subclass's own (a weighted sampler, a shuffled one) is not the Poisson sampling the
        ledger charges."""
        sampler = getattr(loader, "batch_sampler", None)
        if self._sampler is not None and self._sampler in (
            sampler,
            getattr(sampler, "batch_sampler", None),
        ):
            return
        raise ValueError(
            "DPTrainer: the training loop's train dataloader is not the Poisson-sampled one "
            "DPTrainer.get_train_dataloader builds (a subclass overriding it, with its own "
            "sampler?): the ledger's ε holds only for that sampling. Transform examples in "
            "the dataset or the data collator instead"
        )

    # ------------------------------------------------------------------------ the step
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        self._batches_in_step += 1
        if self._batches_in_step > self.args.gradient_accumulation_steps:
            raise LoopOrderError(
                f"DPTrainer: training_step ran {self._batches_in_step} times in one logical batch "
                f"of {self.args.gradient_accumulation_steps} physical batch(es) (a subclass "
                "running it again, on a second view of a batch): those examples would be "
                "clipped twice and both added. Compute every term in one loss, then one backward"
            )
        if isinstance(inputs, _Empty) or not inputs:
            if self.privacy_engine is not None:  # before the step's scaler.step, under fp16
                self.privacy_engine._empty_share_ahead()
            return torch.zeros((), device=self.args.device)
        if self.privacy_engine is None or not self.privacy_engine.attached:
            raise RuntimeError(
                "DPTrainer: a training step ran before the privacy engine was attached"
            )
        model.train()
        inputs_given = inputs
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if self._last_inputs is inputs_given:
            raise LoopOrderError(
                "DPTrainer: training_step ran twice on the same batch (a subclass calling it "
                "again, for a second view or loss term): its examples would be clipped twice "
                "and both added. Compute every term in one loss, then one backward"
            )
        self._last_inputs = inputs_given  # held until the next training step
        self._examples_in_step += 1
        self._in_backward = True
        try:
            self.accelerator.backward(loss)
        finally:
            self._in_backward = False
        return loss.detach() / self.args.gradient_accumulation_steps

    def _backward_gate(self) -> str | None:
        """Why the engine must refuse the backward pass that just ended: one outside
        training_step (a callback's) would add its clipped sums to the next step."""
        if self._in_backward:
            return None
        return (
            "DPTrainer: a backward pass ran outside training_step (in a callback?): its clipped "
            "sums would join the next step's, with examples the step's Poisson sample may "
            "hold too. Run it under torch.no_grad(), or use torch.autograd.grad, which "
            "writes no .grad"
        )

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:  # fmt: skip
        """The mean over the physical batch of each example's own loss."""
        labels = inputs.get("labels")
        if (
            self._token_loss is None
            or self.compute_loss_func is not None  # the user's loss (the self-check sees it)
            or not isinstance(labels, Tensor)
            or labels.dim() != 2
        ):
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        fed = {k: v for k, v in inputs.items() if k != "labels"}
        if self._token_loss == "seq2seq" and "decoder_input_ids" not in fed:
            fed["decoder_input_ids"] = self._decoder_inputs(model, labels)
        outputs = model(**fed)
        logits = outputs["logits"]
        if self._token_loss == "causal":  # token t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        per_token = F.cross_entropy(
            logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none",
            label_smoothing=self.args.label_smoothing_factor,
        )  # fmt: skip
        counts = (labels != -100).sum(dim=1).clamp(min=1)
        loss = (per_token.sum(dim=1) / counts).mean()
        return (loss, outputs) if return_outputs else loss

    def _decoder_inputs(self, model: nn.Module, labels: Tensor) -> Tensor:
        """The decoder's inputs an encoder-decoder model builds from ``labels`` when given them
        (the labels shifted right), built here since the labels are not passed to it."""
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise ValueError(
                f"DPTrainer: {type(base).__name__} is an encoder-decoder model without "
                "prepare_decoder_input_ids_from_labels; pass decoder_input_ids in the batch"
            )
        return prepare(labels=labels)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return 0  # summed into total_flos, it would tell how many examples were sampled

    def _clip_grad_norm(self, model: nn.Module) -> None:
        return None  # max_grad_norm clips the noisy update, in the optimizer's step (below)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Tensor:
        # the pre-noise gradient's norm would be a non-private release: log the noisy one
        self._grad_norm = torch.zeros(())
        return self._grad_norm

    # ------------------------------------------------------------------------ the engine
    def _attach(self, model: nn.Module) -> None:
        if self.privacy_engine is not None and self.privacy_engine.attached:
            return
        if self.privacy_engine is not None:
            raise RuntimeError(
                "DPTrainer: train() was already run; its ledger is spent. Create a new DPTrainer "
                "(or resume from a checkpoint with train(resume_from_checkpoint=...))"
            )
        pa, args = self.privacy_args, self.args
        plan = (
            {"steps": args.max_steps} if args.max_steps > 0 else {"epochs": args.num_train_epochs}
        )
        optimizer = _inner_optimizer(self.optimizer)
        first = optimizer.register_step_pre_hook(self._before_private_step)  # before the engine's
        scaler = getattr(self.accelerator, "scaler", None)
        engine = None
        try:
            engine = PrivacyEngine(
                model, self.optimizer, sample_size=len(self.train_dataset),
                batch_size=self.logical_batch_size(), **plan, **pa.engine_settings(),
                seed=pa.noise_seed, secure_rng=pa.secure_rng, grad_scaler=scaler,
            )  # fmt: skip
            if engine.planned_steps != self.state.max_steps:
                raise RuntimeError(
                    f"DPTrainer: the Trainer plans {self.state.max_steps} steps but the privacy "
                    f"plan has {engine.planned_steps}; pass max_steps or a whole num_train_epochs"
                )
            if self._resume_state is not None:
                engine.load_state_dict(self._resume_state)
        except BaseException:  # leave the model as it was: trainable, no hooks
            if engine is not None:
                engine.detach()
            first.remove()
            raise
        last = optimizer.register_step_pre_hook(self._after_noise)  # after the engine's
        self._handles = [first, last]
        self.privacy_engine = engine
        engine._backward_gate = self._backward_gate
        engine.samples_elsewhere = True  # PoissonBatchSampler

    def _before_private_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._examples_in_step == 0 and self.privacy_engine is not None:
            # a noise-only step is a real step (only this rank's share may be empty: the ranks'
            # draws are engine.data_loader's, which the Trainer does not use)
            self.privacy_engine._begin_logical_batch(0, drawn=False)

    def _after_noise(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Post-processing of the noisy update: max_grad_norm, and the logged norm."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        limit = self.args.max_grad_norm
        if limit and limit > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, limit)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self._grad_norm is not None:
            self._grad_norm.copy_(norm.detach().float().cpu())

    def _detach(self) -> None:
        if self.privacy_engine is not None:
            self.privacy_engine.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------------ run, log, save
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"DPTrainer: no checkpoint to resume from in {self.args.output_dir}"
                )
        if resume_from_checkpoint:
            state = self._load_state(str(resume_from_checkpoint))
            self._resume_state, self._sampling_seed = state["engine"], state["sampling_seed"]
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._last_inputs = None
            self._detach()

    def _load_state(self, folder: str) -> dict:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"DPTrainer: {folder} has no {STATE_FILE}: it is not a DPTrainer checkpoint, "
                "and resuming without its ledger would lose the privacy spent"
            )
        state = torch.load(path, weights_only=False, map_location="cpu")
        saved = state.get("privacy_args")
        if saved != self.privacy_args.to_dict():
            raise ValueError(
                f"DPTrainer: the checkpoint was trained with other privacy arguments ({saved}); "
                "resume with the same PrivacyArguments"
            )
        return state

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.privacy_engine is not None:
            logs = {**logs, "epsilon": self.privacy_engine.epsilon()}
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any, *args: Any, **kwargs: Any) -> None:
        self._checkpointing = True  # save_model, called inside, adds the resume state
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self._checkpointing = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model and, beside it, the privacy arguments without their seeds. A checkpoint
        also gets the ledger, noise and sampling state to resume from: those reveal the noise
        and the batches, so a model saved to publish never has them (keep checkpoints private)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        folder = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(folder, exist_ok=True)
        public = {k: v for k, v in self.privacy_args.to_dict().items() if not k.endswith("_seed")}
        with open(os.path.join(folder, ARGS_FILE), "w") as f:
            f.write(json.dumps(public, indent=2, sort_keys=True) + "\n")
        if self.privacy_engine is not None and getattr(self, "_checkpointing", False):
            torch.save({
                "engine": self.privacy_engine.state_dict(),
                "sampling_seed": self._sampling_seed,
                "privacy_args": self.privacy_args.to_dict(),
            }, os.path.join(folder, STATE_FILE))  # fmt: skip


def _token_loss_kind(model: nn.Module) -> str | None:
    """ "causal" or "token" for models whose built-in loss is a mean over the batch's tokens."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return "seq2seq"  # decoder position t predicts labels[t] (decoder inputs shifted)
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name.endswith(("ForTokenClassification", "ForMaskedLM")):
        return "token"
    return None
