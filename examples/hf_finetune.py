"""DP fine-tuning of a sequence classifier on GLUE SST-2 with transformers' Trainer (DPTrainer).

Run:  python examples/hf_finetune.py                       (downloads SST-2 and the model)
      python examples/hf_finetune.py --data-file train.parquet --model bert-base-uncased
      python examples/hf_finetune.py --synthetic             (offline: a generated task)

Needs: pip install "dpclip[hf]" datasets. Without network access the model falls back to a
small randomly initialised BERT with a word-level tokenizer built from the training text, and
the data to a synthetic sentiment task, so the script always runs (on a CPU in about a minute).
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from dpclip.integrations.transformers import DPTrainer, PrivacyArguments

POSITIVE = "good great fine lovely superb moving charming witty".split()
NEGATIVE = "bad awful dull boring weak tedious clumsy flat".split()
FILLER = "the film movie plot story acting was is and a very quite its".split()


def load_sst2(data_file: str | None, synthetic: bool):
    """SST-2 as (train, validation) datasets with "sentence" and "label" columns."""
    import datasets

    if data_file:  # a local copy in the hub's format (parquet, csv or json)
        kind = data_file.rsplit(".", 1)[-1].replace("tsv", "csv").replace("jsonl", "json")
        options = {"delimiter": "\t"} if data_file.endswith(".tsv") else {}
        data = datasets.load_dataset(kind, data_files=data_file, split="train", **options)
        split = data.train_test_split(test_size=0.1, seed=0)
        return split["train"], split["test"]
    if not synthetic:
        try:
            glue = datasets.load_dataset("glue", "sst2")
            return glue["train"], glue["validation"]
        except Exception as err:  # offline
            print(f"could not load GLUE SST-2 ({type(err).__name__}); using a synthetic task")
    return synthetic_sst2(2000), synthetic_sst2(200, seed=1)


def synthetic_sst2(n: int, seed: int = 0):
    """Sentences whose sentiment words decide the label, in SST-2's columns."""
    import datasets

    rng = random.Random(seed)
    rows = {"sentence": [], "label": [], "idx": []}
    for i in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows["sentence"].append(" ".join(words))
        rows["label"].append(label)
        rows["idx"].append(i)
    return datasets.Dataset.from_dict(rows)


def model_and_tokenizer(name: str, sentences: list[str]):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
        return model, tokenizer, True
    except OSError as err:  # offline: a small random BERT and a tokenizer from the data
        print(f"could not load {name} ({type(err).__name__}); using a small random BERT")
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for s in sentences for w in s.lower().split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", model_max_length=64,
    )  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config), tokenizer, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="prajjwal1/bert-tiny")
    parser.add_argument("--data-file", help="SST-2 in the hub's format (.parquet, .csv, .tsv)")
    parser.add_argument("--synthetic", action="store_true", help="skip the download")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="physical batch")
    parser.add_argument("--accumulation", type=int, default=4, help="physical batches per step")
    parser.add_argument("--lr", type=float, help="default 1e-3, or 1e-2 for the random model")
    parser.add_argument("--output-dir", default="hf_finetune_out")
    args = parser.parse_args(argv)

    train, validation = load_sst2(args.data_file, args.synthetic)
    model, tokenizer, pretrained = model_and_tokenizer(args.model, train["sentence"])
    lr = args.lr or (1e-3 if pretrained else 1e-2)

    def tokenize(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=64)

    columns = [c for c in train.column_names if c != "label"]
    train = train.map(tokenize, batched=True, remove_columns=columns)
    validation = validation.map(tokenize, batched=True, remove_columns=columns)

    def accuracy(prediction):
        return {
            "accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
        }

    trainer = DPTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation, num_train_epochs=args.epochs,
            learning_rate=lr, logging_steps=5, save_strategy="no", report_to=[],
            disable_tqdm=True, per_device_eval_batch_size=256,
        ),
        train_dataset=train, eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
        privacy_args=PrivacyArguments(target_epsilon=args.epsilon),
    )  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    print(f"validation accuracy {metrics['eval_accuracy']:.1%}, "
          f"ε = {trainer.privacy_engine.epsilon():.2f} (δ = {trainer.privacy_engine.target_delta:g})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
