"""Small float64 models, one per supported layer family, for the engine-vs-naive-loop tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Pool(nn.Module):
    """Mean over every dim but batch and the last, so any layer can feed a classifier."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


class TiedLM(nn.Module):
    """Embedding whose weight is also the output head's (tied), as in GPT-2."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.wte(ids)))).mean(dim=1)


class TiedOtherLength(TiedLM):
    """A tied head that reads fewer positions (every other one) than the embedding looks up:
    the cross terms pair sequences of different lengths."""

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.wte(ids)[:, ::2]))).mean(dim=1)


class Reused(nn.Module):
    """One Linear applied twice in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class EmbeddingTwice(nn.Module):
    """One Embedding looking up two id streams (the ids and their reverse)."""

    def __init__(self, vocab: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: Tensor) -> Tensor:
        mixed = self.wte(ids) + torch.tanh(self.wte(ids.flip(1)))
        return self.head(mixed).mean(dim=1)


class _Logits(nn.Module):
    """A transformers model as ids (or pixels) -> logits; an LM's are averaged over positions
    (one label per sample, like the other cases). An encoder-decoder reads the reversed ids."""

    def __init__(
        self, model: nn.Module, mean_over_positions: bool, key: str = "input_ids",
        decoder: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model, self.mean_over_positions, self.key = model, mean_over_positions, key
        self.decoder = decoder

    def forward(self, x: Tensor) -> Tensor:
        extra = {"decoder_input_ids": x.flip(1)} if self.decoder else {}
        logits = self.model(**{self.key: x}, **extra).logits
        return logits.mean(dim=1) if self.mean_over_positions else logits


class ClsAndPositions(nn.Module):
    """A ViT-style head of bare parameters: a CLS token prepended, a learned position table."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 6, 4))
        self.inp, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.inp(x)], dim=1) + self.pos
        return self.head(torch.tanh(h)[:, 0])


class PositionTable(nn.Module):
    """A learned position table indexed by (1, T) ids, broadcast over the batch, and reused: a
    batch-1 output of the fallback, used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, 3))

    def forward(self, ids: Tensor) -> Tensor:
        return self.table[ids]


class WithPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos, self.head = PositionTable(), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        ids = torch.arange(x.shape[1])[None]
        h = torch.tanh(x + self.pos(ids))
        return self.head((h * self.pos(ids.flip(1))).mean(dim=1))


class Attention(nn.Module):
    """nn.MultiheadAttention (after dpclip.fix), sequence-first inside, masks and bias_kv."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, add_bias_kv=True, kdim=3, vdim=5)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        q = x[..., :4].transpose(0, 1)
        k, v = x[..., :3].transpose(0, 1), x[..., 1:6].transpose(0, 1)
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        out, weights = self.attn(q, k, v, key_padding_mask=pad, attn_mask=causal)
        return self.head(out.transpose(0, 1).mean(dim=1) + weights.sum(dim=(1, 2))[:, None])


class Recurrent(nn.Module):
    """nn.LSTM/GRU/RNN (after dpclip.fix): two layers, bidirectional, a given initial state."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.lstm = kind is nn.LSTM
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.zeros(4, x.shape[0], 4, dtype=x.dtype) + 0.1
        out, state = self.rnn(x, (h0, h0.clone()) if self.lstm else h0)
        h = state[0] if self.lstm else state
        return self.head(torch.cat([out[:, -1], h[-1]], dim=-1))


def _fixed(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    import dpclip

    return lambda: dpclip.fix(build())


_VISION = dict(
    image_size=8, patch_size=4, num_channels=2, hidden_size=8, num_hidden_layers=1,
    num_attention_heads=2, intermediate_size=16, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, num_labels=3,
)  # fmt: skip


def _hf(name: str, config: Callable[[], object], **logits: object) -> Callable[[], nn.Module]:
    """A transformers model class ``name`` built from ``config()``, random weights moved off
    their init (norms start at w = 1, layer scales at a constant)."""

    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, name)(config())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return _Logits(model, **logits)  # type: ignore[arg-type]

    return build


def _config(name: str, **kw: object) -> Callable[[], object]:
    def make() -> object:
        import transformers

        return getattr(transformers, name)(**kw)

    return make


def _lora_gpt2() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = _tiny_gpt2().model
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    return _Logits(model, mean_over_positions=True)


def _lora_embedding_gpt2() -> nn.Module:
    """LoRA on the token embedding too: its A and B are ParameterDict entries that the LoRA
    layer reads transposed itself (the lora.Embedding scope's fallback)."""
    from peft import LoraConfig, get_peft_model

    model = _tiny_gpt2().model
    config = LoraConfig(r=2, target_modules=["c_attn", "wte"], fan_in_fan_out=True)
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_embedding_A" in name or "lora_B" in name:  # B starts at zero: nothing to see
            nn.init.normal_(p, std=0.5)
    return _Logits(model, mean_over_positions=True)


def _prefix_gpt2() -> nn.Module:
    from peft import PrefixTuningConfig, get_peft_model

    model = _tiny_gpt2().model
    model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    return _Logits(model, mean_over_positions=True)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return _Logits(GPT2LMHeadModel(config), mean_over_positions=True)


# one encoder layer, no dropout (the oracle and the engine must see the same forward)
_TINY_ENCODER = dict(
    vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=16, max_position_embeddings=12, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)  # fmt: skip


def _tiny_roberta_mlm() -> nn.Module:
    """RoBERTa's LM head holds its decoder's bias a second time, as a parameter of its own."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(**_TINY_ENCODER)
    torch.manual_seed(0)
    return _Logits(RobertaForMaskedLM(config), mean_over_positions=True)


def _tiny_bert_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**_TINY_ENCODER, num_labels=3)
    torch.manual_seed(0)
    return _Logits(BertForSequenceClassification(config), mean_over_positions=False)


def _tiny_decoder(family: str) -> Callable[[], nn.Module]:
    """A one-layer transformers causal LM whose norms are the family's own RMSNorm class."""

    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, f"{family}Config")(
            vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, head_dim=4, max_position_embeddings=12,
        )  # fmt: skip
        torch.manual_seed(0)
        model = getattr(transformers, f"{family}ForCausalLM")(config)
        with torch.no_grad():  # norms start at w = 1: move every weight off its init
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return _Logits(model, mean_over_positions=True)

    return build


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    make_x: Callable[[int, torch.Generator], Tensor]
    classes: int


def _randn(*shape: int) -> Callable[[int, torch.Generator], Tensor]:
    return lambda b, g: torch.randn(b, *shape, generator=g, dtype=torch.float64)


def _ids(vocab: int, T: int, pad: int | None = None) -> Callable[[int, torch.Generator], Tensor]:
    def make(b: int, g: torch.Generator) -> Tensor:
        ids = torch.randint(0, vocab, (b, T), generator=g)
        if pad is not None:
            ids[0, :2] = pad
        return ids

    return make


def _frozen_first() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)  # bias-only for the head
    return model


CASES: dict[str, Case] = {
    "linear": Case(lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), _randn(5), 3),
    "linear_3d_input": Case(lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Pool(), nn.Linear(4, 3)), _randn(6, 5), 3),
    "conv1d": Case(lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), Flatten(), nn.Linear(12, 3)), _randn(2, 8), 3),
    "conv2d_dilated_grouped": Case(lambda: nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2, groups=2, padding="same"), nn.ReLU(inplace=True), Flatten(), nn.Linear(4 * 36, 3)), _randn(2, 6, 6), 3),
    "conv3d": Case(lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), Flatten(), nn.Linear(2 * 27, 3)), _randn(1, 4, 4, 4), 3),
    "embedding_padding_idx": Case(lambda: nn.Sequential(nn.Embedding(9, 4, padding_idx=0), Pool(), nn.Linear(4, 3)), _ids(9, 5, pad=0), 3),
    "layernorm": Case(lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), Pool(), nn.Linear(6, 3)), _randn(3, 5), 3),
    "groupnorm": Case(lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), Flatten(), nn.Linear(16, 3)), _randn(2, 4, 4), 3),
    # no conv bias before InstanceNorm: its gradient is exactly 0 and AUTO-V would scale rounding noise
    "instancenorm": Case(lambda: nn.Sequential(nn.Conv1d(2, 4, 3, bias=False), nn.InstanceNorm1d(4, affine=True), Flatten(), nn.Linear(12, 3)), _randn(2, 5), 3),
    "rmsnorm": Case(lambda: nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Linear(6, 3)), _randn(5), 3),
    "tied_embedding_head": Case(TiedLM, _ids(7, 5), 7),
    "tied_head_other_length": Case(TiedOtherLength, _ids(7, 5), 7),
    "reused_layer": Case(Reused, _randn(4), 3),
    "embedding_twice": Case(EmbeddingTwice, _ids(6, 5), 3),
    "frozen_layers": Case(_frozen_first, _randn(5), 3),
    "gpt2_tiny": Case(_tiny_gpt2, _ids(11, 6), 11),
    "roberta_mlm_tiny": Case(_tiny_roberta_mlm, _ids(11, 6), 11),
    "bert_classifier_tiny": Case(_tiny_bert_classifier, _ids(11, 6), 3),
    "llama_tiny": Case(_tiny_decoder("Llama"), _ids(11, 6), 11),
    "mistral_tiny": Case(_tiny_decoder("Mistral"), _ids(11, 6), 11),
    "qwen2_tiny": Case(_tiny_decoder("Qwen2"), _ids(11, 6), 11),
    "gemma_tiny": Case(_tiny_decoder("Gemma"), _ids(11, 6), 11),
    "gemma2_tiny": Case(_tiny_decoder("Gemma2"), _ids(11, 6), 11),
    # the generic fallback, scopes and dpclip.fix
    "cls_and_positions": Case(ClsAndPositions, _randn(5, 3), 3),
    "position_table_reused": Case(WithPositions, _randn(5, 3), 3),
    "conv_transpose1d": Case(lambda: nn.Sequential(nn.ConvTranspose1d(2, 3, 3, stride=2), nn.Tanh(), Flatten(), nn.Linear(33, 3)), _randn(2, 5), 3),
    "conv_transpose2d": Case(lambda: nn.Sequential(nn.ConvTranspose2d(2, 2, 2, groups=2), nn.Tanh(), Flatten(), nn.Linear(50, 3)), _randn(2, 4, 4), 3),
    "conv_transpose3d": Case(lambda: nn.Sequential(nn.ConvTranspose3d(1, 2, 2), nn.Tanh(), Flatten(), nn.Linear(2 * 27, 3)), _randn(1, 2, 2, 2), 3),
    "mha_fixed": Case(_fixed(Attention), _randn(5, 6), 3),
    "lstm_fixed": Case(_fixed(lambda: Recurrent(nn.LSTM)), _randn(5, 3), 3),
    "gru_fixed": Case(_fixed(lambda: Recurrent(nn.GRU)), _randn(5, 3), 3),
    "rnn_fixed": Case(_fixed(lambda: Recurrent(nn.RNN)), _randn(5, 3), 3),
    "vit_tiny": Case(_hf("ViTForImageClassification", _config("ViTConfig", **_VISION), mean_over_positions=False, key="pixel_values"), _randn(2, 8, 8), 3),
    "deit_tiny": Case(_hf("DeiTForImageClassification", _config("DeiTConfig", **_VISION), mean_over_positions=False, key="pixel_values"), _randn(2, 8, 8), 3),
    "beit_tiny": Case(_hf("BeitForImageClassification", _config("BeitConfig", **_VISION, use_relative_position_bias=True, layer_scale_init_value=0.5, drop_path_rate=0.0), mean_over_positions=False, key="pixel_values"), _randn(2, 8, 8), 3),
    "beit_shared_bias_tiny": Case(_hf("BeitForImageClassification", _config("BeitConfig", **_VISION, use_shared_relative_position_bias=True, use_mean_pooling=False, drop_path_rate=0.0), mean_over_positions=False, key="pixel_values"), _randn(2, 8, 8), 3),
    "swin_tiny": Case(_hf("SwinForImageClassification", _config("SwinConfig", image_size=8, patch_size=2, num_channels=2, embed_dim=4, depths=[1, 1], num_heads=[2, 2], window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3), mean_over_positions=False, key="pixel_values"), _randn(2, 8, 8), 3),
    "convnext_tiny": Case(_hf("ConvNextForImageClassification", _config("ConvNextConfig", num_channels=2, hidden_sizes=[4, 8], depths=[1, 1], num_stages=2, num_labels=3, drop_path_rate=0.0), mean_over_positions=False, key="pixel_values"), _randn(2, 8, 8), 3),
    "opt_tiny": Case(_hf("OPTForCausalLM", _config("OPTConfig", vocab_size=11, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=8, dropout=0.0, attention_dropout=0.0), mean_over_positions=True), _ids(11, 6), 11),
    # OPT-350m's layout: the norms after each half, embeddings projected in and out
    "opt_post_ln_tiny": Case(_hf("OPTForCausalLM", _config("OPTConfig", vocab_size=11, hidden_size=8, do_layer_norm_before=False, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=6, dropout=0.0, attention_dropout=0.0), mean_over_positions=True), _ids(11, 6), 11),
    "bart_tiny": Case(_hf("BartForConditionalGeneration", _config("BartConfig", vocab_size=11, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0), mean_over_positions=True, decoder=True), _ids(11, 6), 11),
    # sequence-first inside its attention ((T, B, d) through the projections); T a multiple of
    # the attention window (shorter sequences are padded: transformers' own gradients are NaN)
    "longformer_mlm_tiny": Case(_hf("LongformerForMaskedLM", _config("LongformerConfig", vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=32, attention_window=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), mean_over_positions=True), _ids(11, 8), 11),
    "led_tiny": Case(_hf("LEDForConditionalGeneration", _config("LEDConfig", vocab_size=11, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_encoder_position_embeddings=32, max_decoder_position_embeddings=32, attention_window=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0), mean_over_positions=True, decoder=True), _ids(11, 8), 11),
    "blenderbot_tiny": Case(_hf("BlenderbotForConditionalGeneration", _config("BlenderbotConfig", vocab_size=11, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0), mean_over_positions=True, decoder=True), _ids(11, 6), 11),
    "blenderbot_small_tiny": Case(_hf("BlenderbotSmallForConditionalGeneration", _config("BlenderbotSmallConfig", vocab_size=11, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0), mean_over_positions=True, decoder=True), _ids(11, 6), 11),
    "mbart_tiny": Case(_hf("MBartForConditionalGeneration", _config("MBartConfig", vocab_size=11, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16, scale_embedding=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0), mean_over_positions=True, decoder=True), _ids(11, 6), 11),
    "mt5_tiny": Case(_hf("MT5ForConditionalGeneration", _config("MT5Config", vocab_size=11, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, bos_token_id=None, eos_token_id=1, pad_token_id=0), mean_over_positions=True, decoder=True), _ids(11, 6), 11),
    "swinv2_tiny": Case(_hf("Swinv2ForImageClassification", _config("Swinv2Config", image_size=8, patch_size=2, num_channels=2, embed_dim=4, depths=[1, 1], num_heads=[2, 2], window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3), mean_over_positions=False, key="pixel_values"), _randn(2, 8, 8), 3),
    "mpnet_tiny": Case(_hf("MPNetForSequenceClassification", _config("MPNetConfig", vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3), mean_over_positions=False), _ids(11, 6), 3),
    "t5_tiny": Case(_hf("T5ForConditionalGeneration", _config("T5Config", vocab_size=11, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, bos_token_id=None, eos_token_id=1, pad_token_id=0), mean_over_positions=True, decoder=True), _ids(11, 6), 11),
    "falcon_tiny": Case(_hf("FalconForCausalLM", _config("FalconConfig", vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2), mean_over_positions=True), _ids(11, 6), 11),
    "deberta_v2_tiny": Case(_hf("DebertaV2ForSequenceClassification", _config("DebertaV2Config", vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, relative_attention=True, position_buckets=4, num_labels=3), mean_over_positions=False), _ids(11, 6), 3),
    "deberta_tiny": Case(_hf("DebertaForSequenceClassification", _config("DebertaConfig", vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, relative_attention=True, num_labels=3), mean_over_positions=False), _ids(11, 6), 3),
    "gpt2_lora_tiny": Case(_lora_gpt2, _ids(11, 6), 11),
    "gpt2_lora_embedding_tiny": Case(_lora_embedding_gpt2, _ids(11, 6), 11),
    "gpt2_prefix_tuning_tiny": Case(_prefix_gpt2, _ids(11, 6), 11),
}  # fmt: skip


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[name].build().double()


def batch(name: str, size: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    case = CASES[name]
    return case.make_x(size, g), torch.randint(0, case.classes, (size,), generator=g)
