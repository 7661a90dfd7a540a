"""Data-parallel DP training under HF Accelerate: `accelerator.prepare` wraps the model in
DistributedDataParallel as usual, and dpclip takes over the gradient reduction.

Run:  accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py [EPOCHS]
      (on a machine without GPUs the processes train on the CPU, over gloo)
"""

import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import dpclip
from dpclip.datasets import load_dataset
from dpclip.models import mlp

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
accelerator = Accelerator(cpu=not torch.cuda.is_available())
torch.manual_seed(0)
train, test, _ = load_dataset("digits")
model = mlp((1, 8, 8), num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model, optimizer = accelerator.prepare(model, optimizer)  # not the data: dpclip samples it
engine = dpclip.PrivacyEngine(
    model, optimizer, sample_size=len(train), batch_size=256,
    epochs=epochs, target_epsilon=3.0, target_delta=1e-5,
)  # fmt: skip

for epoch in range(epochs):
    model.train()
    for batch in engine.data_loader(train, physical_batch_size=64):  # this process's share
        for x, y in batch:
            accelerator.backward(F.cross_entropy(model(x.to(accelerator.device)),
                                                 y.to(accelerator.device)))  # fmt: skip
        optimizer.step()
        optimizer.zero_grad()
    if accelerator.is_main_process:
        model.eval()
        with torch.no_grad():
            x, y = (t.to(accelerator.device) for t in test.tensors)
            accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
        print(f"epoch {epoch + 1}: test accuracy {accuracy:.1%}, ε = {engine.epsilon():.2f}")
accelerator.wait_for_everyone()  # rank 0 may still evaluate: tear gloo down together
accelerator.end_training()
