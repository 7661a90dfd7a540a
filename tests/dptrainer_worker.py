"""One rank of tests/test_hf_trainer.py's multi-process run: `torchrun --nproc-per-node 2`.

Trains the tests' tiny GPT-2 through DPTrainer without noise, in fp32, then in fp16 with a
GradScaler, and writes this rank's parameters and steps to OUT/<precision>-rank-<r>.pt; the test
compares them with one process. Then in fp16 with noise where a rank's share of a logical batch
is empty (OUT/shares-rank-<r>.pt).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dpclip.integrations.transformers import PrivacyArguments
from tests import test_hf_trainer as t


def main(out: str) -> None:
    torch.set_num_threads(1)
    for precision in ("fp32", "fp16"):
        privacy = PrivacyArguments(noise_multiplier=0.0, sampling_seed=3)
        trainer = t._trainer(Path(out) / precision, model=t._gpt2(dropout=0.0), privacy=privacy,
                             max_steps=4, per_device_train_batch_size=8,
                             fp16=precision == "fp16")  # fmt: skip
        if precision == "fp16":  # Accelerate makes its GradScaler on GPUs only
            trainer.accelerator.scaler = t.fp16_scaler(t.OVERFLOWING_SCALE)
        trainer.train()
        rank = dist.get_rank()  # the Trainer made the process group
        torch.save({
            "params": [p.detach().clone() for p in trainer.model.parameters()],
            "steps": trainer.privacy_engine.steps_taken, "world": dist.get_world_size(),
            "batch": trainer.logical_batch_size(),
            "scale": trainer.accelerator.scaler.get_scale() if precision == "fp16" else None,
        }, Path(out) / f"{precision}-rank-{rank}.pt")  # fmt: skip
    # fp16 with noise, one expected example per rank and step: rank 1's first share is empty
    privacy = PrivacyArguments(
        noise_multiplier=1.0, sampling_seed=t.EMPTY_SHARES_SEED, noise_seed=0
    )
    trainer = t._trainer(Path(out) / "shares", model=t._gpt2(dropout=0.0), privacy=privacy,
                         max_steps=4, per_device_train_batch_size=1,
                         gradient_accumulation_steps=1, fp16=True)  # fmt: skip
    trainer.accelerator.scaler = t.fp16_scaler()
    trainer.train()
    torch.save({
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "steps": trainer.privacy_engine.steps_taken, "eps": trainer.privacy_engine.epsilon(),
    }, Path(out) / f"shares-rank-{rank}.pt")  # fmt: skip
    # Both ranks done before teardown: a rank exiting with the gloo group alive while the other
    # still ran aborted ("terminate called without an active exception") now and then.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
