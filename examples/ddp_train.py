"""Data-parallel DP training with torchrun: every process clips its own examples, the noise is
added once per step over the world, and every process ends each step with the same model.

Run:  torchrun --nproc-per-node 2 examples/ddp_train.py [EPOCHS]      (CPU: gloo; GPUs: nccl)
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import dpclip
from dpclip.datasets import load_dataset
from dpclip.models import cnn

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets rank and world size
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
else:  # share the cores between the processes
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))

torch.manual_seed(0)
train, test, _ = load_dataset("digits")  # every process holds the whole training set
model = DistributedDataParallel(cnn((1, 8, 8), num_classes=10).to(device))
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
engine = dpclip.PrivacyEngine(
    model, optimizer, sample_size=len(train), batch_size=256,  # the expected *global* batch
    epochs=epochs, target_epsilon=3.0, target_delta=1e-5,
)  # fmt: skip

for epoch in range(epochs):
    model.train()
    for batch in engine.data_loader(train, physical_batch_size=64):  # this process's share
        for x, y in batch:
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()  # the clipped sums of every process, summed, noised once
        optimizer.zero_grad()
    if rank == 0:
        model.eval()
        with torch.no_grad():
            x, y = (t.to(device) for t in test.tensors)
            accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
        print(f"epoch {epoch + 1}: test accuracy {accuracy:.1%}, ε = {engine.epsilon():.2f}")
dist.barrier()  # rank 0 may still evaluate: tear the group down together
dist.destroy_process_group()
