"""DPTrainer: DP fine-tuning through transformers' Trainer, on tiny random-weight models (CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import dpclip  # noqa: E402
from dpclip.integrations.transformers import (  # noqa: E402
    ARGS_FILE,
    STATE_FILE,
    DPTrainer,
    PoissonBatchSampler,
    PrivacyArguments,
)
from tests.ports import free_port  # noqa: E402

VOCAB, T = 32, 10


def _counting(n: int, seed: int = 0) -> list[dict]:
    """A learnable LM task: each sequence counts up (mod VOCAB) from a random start."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(T)) % VOCAB
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _gpt2(dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=dropout,
        embd_pdrop=dropout, attn_pdrop=dropout,
    ))  # fmt: skip


def _args(tmp_path, **kw) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=16,
        gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=5e-3, logging_steps=4,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    settings.update(kw)
    return TrainingArguments(**settings)


def _trainer(tmp_path, model=None, data=None, privacy=None, **kw) -> DPTrainer:
    return DPTrainer(
        model=model if model is not None else _gpt2(), args=_args(tmp_path, **kw),
        train_dataset=data if data is not None else _counting(256),
        data_collator=default_data_collator,
        privacy_args=privacy or PrivacyArguments(target_epsilon=3.0, noise_seed=0, sampling_seed=0),
    )  # fmt: skip


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_gpt2_causal_lm_learns_and_logs_epsilon_up_to_the_target(tmp_path):
    trainer = _trainer(tmp_path, data=_counting(512), num_train_epochs=3)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.5  # it learns the counting task (3.4 -> 2.6)
    logged = [h["epsilon"] for h in trainer.state.log_history if "loss" in h]
    assert logged == sorted(logged) and logged[0] > 0  # ε with the loss, growing
    final = trainer.privacy_engine.epsilon()
    assert 0.9 * 3.0 <= final <= 3.0
    assert trainer.state.log_history[-1]["epsilon"] == final
    assert trainer.privacy_engine.steps_taken == trainer.state.global_step
    # detached after train(): the parameters are trainable again
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_bert_sequence_classifier_learns_a_synthetic_task(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2,
    ))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (256, T), generator=g)
    labels = (ids[:, 0] < VOCAB // 2).long()  # the first token decides
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(256)]
    trainer = _trainer(tmp_path, model=model, data=data, num_train_epochs=4, learning_rate=1e-2,
                       privacy=PrivacyArguments(target_epsilon=8.0, noise_seed=0, sampling_seed=0))  # fmt: skip
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.1
    assert 0.9 * 8.0 <= trainer.privacy_engine.epsilon() <= 8.0


def _masked_lm():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ))  # fmt: skip


def _seq2seq():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    ))  # fmt: skip


@pytest.mark.parametrize("build", [_masked_lm, _seq2seq], ids=["masked-lm", "seq2seq"])
def test_masked_and_seq2seq_losses_are_each_examples_own_mean(tmp_path, build):
    """Their built-in loss averages over every labelled token of the batch, so an example's
    weight depends on the others' label counts (the self-check sees it only when the first
    batch's counts differ): DPTrainer's loss is the mean of each example's own loss."""
    model = build()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 8), generator=g)
    labels = ids.clone()
    labels[0, 2:] = labels[1, 5:] = -100  # 2, 5 and 8 labelled tokens
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=_counting(64),
                        data_collator=default_data_collator,
                        privacy_args=PrivacyArguments(noise_multiplier=1.0))  # fmt: skip
    got = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    own = [model(input_ids=ids[i : i + 1], labels=labels[i : i + 1]).loss for i in range(3)]
    torch.testing.assert_close(got, torch.stack(own).mean(), rtol=1e-5, atol=1e-6)
    mixed = model(input_ids=ids, labels=labels).loss  # what the model alone would train on
    assert not torch.allclose(mixed, got, rtol=1e-3)


def test_resume_from_a_checkpoint_ends_like_the_uninterrupted_run(tmp_path):
    privacy = PrivacyArguments(target_epsilon=3.0, noise_seed=1, sampling_seed=2)
    whole = _trainer(tmp_path / "whole", privacy=privacy)
    whole.train()

    first = _trainer(tmp_path / "cut", privacy=privacy, save_strategy="steps", save_steps=8)
    first.train()
    checkpoint = tmp_path / "cut" / "run" / "checkpoint-8"
    assert (checkpoint / STATE_FILE).is_file() and (checkpoint / ARGS_FILE).is_file()
    resumed = _trainer(tmp_path / "cut", privacy=privacy, save_strategy="steps", save_steps=8)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.privacy_engine.epsilon() == whole.privacy_engine.epsilon()
    assert resumed.privacy_engine.steps_taken == whole.privacy_engine.steps_taken
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resuming_from_a_checkpoint_without_dpclip_state_is_refused(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="not a DPTrainer checkpoint"):
        trainer.train(resume_from_checkpoint=str(folder))
    assert trainer.privacy_engine is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_trains_only_the_adapters(tmp_path, family):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    if family == "llama":
        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        ))  # fmt: skip
        targets = ["q_proj", "v_proj"]
    else:
        base, targets = _gpt2(), ["c_attn"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets))
    trainable, total = model.get_nb_trainable_parameters()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = []

    class Count(TrainerCallback):  # what the Trainer's own count sees as training starts
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(sum(p.numel() for p in kwargs["model"].parameters() if p.requires_grad))

    trainer = _trainer(tmp_path, model=model, num_train_epochs=1)
    trainer.add_callback(Count())
    trainer.train()
    assert seen == [trainable] and 0 < trainable < total
    assert model.get_nb_trainable_parameters() == (trainable, total)  # after training, too
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(
        not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters
    )
    assert trainer.privacy_engine.steps_taken == trainer.state.global_step > 0


@pytest.mark.parametrize(
    "adapter, message",
    [("dora", r"q_proj \(Linear\): PEFT DoRA \(use_dora=True\) is not supported.*use_dora=False"),
     ("ia3", r"PEFT IA3 is not supported.*use LoRA")],
)  # fmt: skip
def test_peft_adapters_without_a_per_example_form_are_refused_at_construction(adapter, message):
    """They failed at forward before, with advice about flattened tokens or tied weights."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    ))  # fmt: skip
    config = (
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
        if adapter == "dora"
        else peft.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
    )
    model = peft.get_peft_model(base, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    with pytest.raises(dpclip.UnsupportedModuleError, match=message):
        dpclip.PrivacyEngine(model, opt, sample_size=64, batch_size=8, steps=2,
                             noise_multiplier=1.0)  # fmt: skip
    assert all(p.requires_grad for p in trainable)


def test_max_grad_norm_clips_the_noisy_update_and_the_logged_norm_is_the_noisy_one(tmp_path):
    norms = []

    class Watch(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            grads = [p.grad for p in kwargs["model"].parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())

    trainer = _trainer(tmp_path, max_grad_norm=0.5, num_train_epochs=1, logging_steps=1)
    trainer.add_callback(Watch())
    trainer.train()
    assert norms and max(norms) <= 0.5 + 1e-4  # the update the optimizer stepped on
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    sigma = trainer.privacy_engine.noise_multiplier
    d = sum(p.numel() for p in trainer.model.parameters())
    expected_noise = sigma * 1.0 / trainer.logical_batch_size() * d**0.5  # ‖σR/B · ξ‖
    assert all(0.8 * expected_noise < n < 1.5 * expected_noise for n in logged)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_steps_with_an_empty_logical_batch_are_taken_and_accounted(tmp_path, precision):
    """q = 1/64: about a third of the logical batches are empty, the first one too (seed 6);
    each is a noise-only step, in the ledger like any other (under fp16's scaler too, which
    makes its scale at its first loss otherwise)."""
    assert next(iter(PoissonBatchSampler(64, 1 / 64, 1, seed=6))) == []
    trainer = _trainer(tmp_path, data=_counting(64), per_device_train_batch_size=1,
                       gradient_accumulation_steps=1, num_train_epochs=1,
                       fp16=precision == "fp16",
                       privacy=PrivacyArguments(noise_multiplier=1.0, sampling_seed=6))  # fmt: skip
    if precision == "fp16":
        trainer.accelerator.scaler = fp16_scaler()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 64 == trainer.privacy_engine.steps_taken
    assert all(
        not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)
    )


def test_poisson_batch_sampler_splits_each_logical_batch_and_replays_an_epoch():
    sampler = PoissonBatchSampler(100, 0.2, accumulation=3, seed=5)
    assert len(sampler) == 5 * 3
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first  # the same epoch replays
    assert list(sampler) != first  # the next pass without set_epoch is a new sample
    steps = [first[i : i + 3] for i in range(0, 15, 3)]
    for parts in steps:
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        flat = [i for p in parts for i in p]
        assert flat == sorted(set(flat))  # each example at most once per logical batch


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(train_sampling_strategy="group_by_length"), "not Poisson sampling"),
        (dict(gradient_checkpointing=True), "gradient_checkpointing is not supported"),
        (dict(auto_find_batch_size=True), "auto_find_batch_size"),
        (dict(ignore_data_skip=True), "draw its first Poisson samples again"),
        (dict(accelerator_config={"dispatch_batches": True}), "deal out batches of several"),
        (dict(include_num_input_tokens_seen=True), "tells each Poisson sample's size"),
    ],
)
def test_settings_that_break_dp_are_refused(tmp_path, settings, message):
    model = _gpt2()
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, model=model, **settings)
    assert all(p.requires_grad for p in model.parameters())


def test_a_train_dataloader_of_a_subclass_is_refused_before_any_step(tmp_path):
    """A sampler of its own (class-balanced, shuffled) is not the sampling the ledger charges."""

    class OwnLoader(DPTrainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(
                self.train_dataset, batch_size=16, shuffle=True, collate_fn=self.data_collator
            )

    trainer = OwnLoader(model=_gpt2(), args=_args(tmp_path, max_steps=2),
                        train_dataset=_counting(64), data_collator=default_data_collator,
                        privacy_args=PrivacyArguments(noise_multiplier=1.0))  # fmt: skip
    with pytest.raises(ValueError, match="not the Poisson-sampled one"):
        trainer.train()
    assert trainer.privacy_engine is None and trainer.state.global_step == 0


def test_the_logged_flos_tell_nothing_of_the_sample_sizes(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, privacy=PrivacyArguments(noise_multiplier=1.0))
    trainer.train()
    assert trainer.state.total_flos == 0


def test_an_unsupported_model_is_refused_naming_the_module(tmp_path):
    model = _gpt2()
    model.transformer.h[0].mlp.act = torch.nn.BatchNorm1d(16)
    with pytest.raises(dpclip.UnsupportedModuleError, match="BatchNorm1d"):
        _trainer(tmp_path, model=model)


def test_an_iterable_train_set_is_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_counting(8))

    with pytest.raises(ValueError, match="map-style dataset"):
        _trainer(tmp_path, data=Stream())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(), "exactly one of target_epsilon= and noise_multiplier="),
        (dict(target_epsilon=3.0, noise_multiplier=1.0), "exactly one"),
        (dict(target_epsilon=3.0, clipping="nope"), "PrivacyArguments: .*clipping"),
        (dict(target_epsilon=-1.0), "PrivacyArguments: .*target_epsilon"),
        (dict(target_epsilon=3.0, clipping_style=[["a"]]), "clipping_style must be a name"),
        (dict(target_epsilon=3.0, noise_seed=1, secure_rng=True), "cannot take a noise_seed"),
    ],
)
def test_bad_privacy_arguments_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        PrivacyArguments(**kw)


def test_the_saved_model_has_its_privacy_arguments_and_no_seed_or_noise_state(tmp_path):
    """A model saved to publish must not reveal the noise or the batches: the engine state
    (noise generator, sampling seed) and the seeds go into checkpoints only."""
    privacy = PrivacyArguments(noise_multiplier=1.0, clip_norm=2.0, noise_seed=5, sampling_seed=6)
    trainer = _trainer(tmp_path, privacy=privacy, max_steps=2, save_strategy="steps",
                       save_steps=2)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / ARGS_FILE).read_text())
    public = {k: v for k, v in privacy.to_dict().items() if not k.endswith("_seed")}
    assert saved == public and not os.path.exists(tmp_path / "final" / STATE_FILE)
    assert "noise_seed" not in saved and "sampling_seed" not in saved
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert os.path.isfile(checkpoint / STATE_FILE)  # what resuming needs
    assert trainer.privacy_engine.steps_taken == 2


def test_a_backward_outside_training_step_or_a_second_on_one_batch_is_refused(tmp_path):
    """A callback's backward would join the next step's sums; a subclass running
    training_step twice on a batch would clip its examples twice (2R for noise meant for R)."""

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            ids = torch.arange(T)[None] % VOCAB
            model(input_ids=ids, labels=ids).loss.backward()

    trainer = _trainer(tmp_path / "a", max_steps=2, privacy=PrivacyArguments(noise_multiplier=1.0))
    trainer.add_callback(Probe())
    with pytest.raises(dpclip.LoopOrderError, match="outside training_step"):
        trainer.train()

    class Twice(DPTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            super().training_step(model, inputs, num_items_in_batch)
            return super().training_step(model, inputs, num_items_in_batch)

    twice = Twice(model=_gpt2(), args=_args(tmp_path / "b", max_steps=1),
                  train_dataset=_counting(256), data_collator=default_data_collator,
                  privacy_args=PrivacyArguments(noise_multiplier=1.0))  # fmt: skip
    with pytest.raises(dpclip.LoopOrderError, match="twice on the same batch"):
        twice.train()

    class TwoViews(DPTrainer):  # the second view a new dict: caught by the count per step
        def training_step(self, model, inputs, num_items_in_batch=None):
            super().training_step(model, dict(inputs), num_items_in_batch)
            return super().training_step(model, dict(inputs), num_items_in_batch)

    views = TwoViews(model=_gpt2(), args=_args(tmp_path / "c", max_steps=1),
                     train_dataset=_counting(256), data_collator=default_data_collator,
                     privacy_args=PrivacyArguments(noise_multiplier=1.0))  # fmt: skip
    with pytest.raises(dpclip.LoopOrderError, match="3 times in one logical batch of 2"):
        views.train()
    assert views.privacy_engine.steps_taken == 0


def _padded_causal_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 8), generator=g)
    labels = ids.clone()
    labels[0, 3:] = labels[1, 6:] = -100  # 3, 6 and 8 labelled tokens
    return ids, labels


def test_label_smoothing_applies_to_each_examples_own_loss(tmp_path):
    from transformers.trainer_pt_utils import LabelSmoother

    model = _gpt2(dropout=0.0)
    trainer = _trainer(tmp_path, model=model, label_smoothing_factor=0.2,
                       privacy=PrivacyArguments(noise_multiplier=1.0))  # fmt: skip
    ids, labels = _padded_causal_batch()
    got = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    smooth = LabelSmoother(epsilon=0.2)
    own = [
        smooth(model(input_ids=ids[i : i + 1]), labels[i : i + 1], shift_labels=True)
        for i in range(3)
    ]
    torch.testing.assert_close(got, torch.stack(own).mean(), rtol=1e-5, atol=1e-6)
    plain = _trainer(tmp_path / "b", model=model, privacy=PrivacyArguments(noise_multiplier=1.0))
    assert not torch.allclose(plain.compute_loss(model, {"input_ids": ids, "labels": labels}), got)


def test_a_compute_loss_func_is_used_and_one_mixing_examples_is_refused(tmp_path):
    def own_mean(outputs, labels, num_items_in_batch=None):
        logits, labels = outputs["logits"][:, :-1], labels[:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return (per_token.sum(1) / (labels != -100).sum(1)).mean()

    def token_mean(outputs, labels, num_items_in_batch=None):  # mixes: weights by the others
        logits, labels = outputs["logits"][:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.transpose(1, 2), labels)

    model = _gpt2(dropout=0.0)
    ids, labels = _padded_causal_batch()
    trainer = _trainer(tmp_path, model=model, privacy=PrivacyArguments(noise_multiplier=1.0))
    trainer.compute_loss_func = own_mean
    got = trainer.compute_loss(model, {"input_ids": ids, "labels": labels.clone()})
    torch.testing.assert_close(got, own_mean(model(input_ids=ids), labels))
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: got * 0 + 7.0
    assert trainer.compute_loss(model, {"input_ids": ids, "labels": labels.clone()}) == 7.0

    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": ids, "labels": ids.clone()}
        for ids in torch.randint(1, VOCAB, (64, T), generator=g)
    ]
    for k, row in enumerate(data):
        row["labels"][1 + k % 7 :] = -100  # different label counts in every batch
    mixing = DPTrainer(model=_gpt2(dropout=0.0), args=_args(tmp_path / "m", max_steps=1),
                       train_dataset=data, data_collator=default_data_collator,
                       privacy_args=PrivacyArguments(noise_multiplier=1.0, sampling_seed=0),
                       compute_loss_func=token_mean)  # fmt: skip
    with pytest.raises(dpclip.SelfCheckError):
        mixing.train()
    assert mixing.privacy_engine.steps_taken == 0


def test_training_twice_with_one_trainer_is_refused(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, privacy=PrivacyArguments(noise_multiplier=1.0))
    trainer.train()
    with pytest.raises(RuntimeError, match="already run"):
        trainer.train()


def fp16_scaler(init_scale: float = 2.0**12) -> torch.amp.GradScaler:
    """Accelerate creates its GradScaler on GPUs only; on the CPU one is given to it, so the path
    DPTrainer takes on a GPU (the scaler handed to the engine) runs in CI."""
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


# On the CPU the Trainer's fp16 leaves the model in float32: at this loss scale the first step's
# per-example norms overflow float32 on one rank or both, and the scaler skips it
OVERFLOWING_SCALE = 2.0**65


def test_fp16_with_a_grad_scaler_trains_like_fp32(tmp_path):
    runs = {}
    for precision in ("fp32", "fp16"):
        trainer = _trainer(tmp_path / precision, max_steps=4, fp16=precision == "fp16")
        if precision == "fp16":
            trainer.accelerator.scaler = fp16_scaler()
        trainer.train()
        assert trainer.privacy_engine.steps_taken == 4
        runs[precision] = [p.detach().clone() for p in trainer.model.parameters()]
    for a, b in zip(runs["fp16"], runs["fp32"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_bf16_autocast_trains_through_dptrainer(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, bf16=True)
    trainer.train()
    assert trainer.privacy_engine.steps_taken == 3
    assert all(
        p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters()
    )


def test_epsilon_reaches_every_reporter(tmp_path):
    seen = []

    class Reporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(logs)

    trainer = _trainer(tmp_path, max_steps=4, logging_steps=2)
    trainer.add_callback(Reporter())
    trainer.train()
    assert [round(s["epsilon"], 12) for s in seen if "loss" in s][-1] > 0
    assert all("epsilon" in s for s in seen)


def test_prefix_tuning_trains_through_dptrainer(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _gpt2(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = _trainer(tmp_path, model=model, max_steps=3)
    trainer.train()
    assert trainer.privacy_engine.steps_taken == 3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# two ranks, one expected example per rank and step (q = 2/256): rank 1's shares of the first
# and third logical batches are empty, rank 0's of the third too
EMPTY_SHARES_SEED = 5


def _shares(seed: int, steps: int = 4) -> list[list[int]]:
    """Each rank's share sizes of the first ``steps`` logical batches."""
    sizes = []
    for rank in range(2):
        batches = iter(PoissonBatchSampler(256, 2 / 256, 1, seed, shard=(rank, 2)))
        sizes.append([len(next(batches)) for _ in range(steps)])
    return sizes


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The ranks' results of tests/dptrainer_worker.py under torchrun, 2 processes (gloo)."""
    import subprocess
    import sys

    tmp_path = tmp_path_factory.mktemp("torchrun")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), os.path.join(root, "tests", "dptrainer_worker.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return lambda precision: [
        torch.load(tmp_path / f"{precision}-rank-{r}.pt", weights_only=False) for r in range(2)
    ]


def test_two_processes_step_together_when_one_share_is_empty(two_processes):
    """A rank whose share of a logical batch is empty takes the noise-only step with the others
    (under fp16 too, where its scaler has no loss to scale, on the first step)."""
    shares = _shares(EMPTY_SHARES_SEED)
    assert shares == [[1, 1, 0, 1], [0, 1, 0, 1]]
    ranks = two_processes("shares")
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4 and ranks[0]["eps"] == ranks[1]["eps"]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_two_processes_train_like_one_process_on_the_same_global_batches(
    tmp_path, two_processes, precision
):
    """The logical batch counts the world; without noise (and dropout) the result equals one
    process with twice the per-device batch and the same sampling seed, in fp16 with a
    GradScaler too (the ranks skip an overflowing step together)."""
    ranks = two_processes(precision)
    assert ranks[0]["world"] == 2 and ranks[0]["batch"] == 8 * 2 * 2
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    single = _trainer(tmp_path / "one", model=_gpt2(dropout=0.0), max_steps=4,
                      per_device_train_batch_size=16, fp16=precision == "fp16",
                      privacy=PrivacyArguments(noise_multiplier=0.0, sampling_seed=3))  # fmt: skip
    if precision == "fp16":  # twice the physical batch: the mean loss halves each gradient
        single.accelerator.scaler = fp16_scaler(2 * OVERFLOWING_SCALE)
    single.train()
    if precision == "fp16":  # one step skipped, on both ranks and in one process
        assert single.privacy_engine.steps_taken == ranks[0]["steps"] == ranks[1]["steps"] == 3
        assert ranks[0]["scale"] == ranks[1]["scale"] == OVERFLOWING_SCALE / 2
    else:
        assert single.privacy_engine.steps_taken == ranks[0]["steps"] == 4
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-3, atol=2e-4)
    for a, b in zip(ranks[0]["params"], single.model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), **tol)


def test_a_checkpoint_from_another_plan_is_refused_and_the_model_stays_trainable(tmp_path):
    privacy = PrivacyArguments(noise_multiplier=1.0)
    first = _trainer(tmp_path, privacy=privacy, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    other = _trainer(tmp_path, data=_counting(128), privacy=privacy, max_steps=4)  # other q
    with pytest.raises(ValueError, match="sample_rate"):
        other.train(resume_from_checkpoint=str(checkpoint))
    assert all(p.requires_grad for p in other.model.parameters())
    assert other.privacy_engine is None
