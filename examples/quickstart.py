"""Quickstart: DP-SGD with automatic clipping on scikit-learn's digits, in an ordinary loop.

Run:  python examples/quickstart.py [EPOCHS]        (needs: pip install "dpclip[examples]")
"""

import sys

import torch
import torch.nn.functional as F

import dpclip
from dpclip.datasets import load_dataset
from dpclip.models import mlp

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 30
torch.manual_seed(0)
train, test, _ = load_dataset("digits")  # 1,437 training and 360 test images of 8×8 pixels
model = mlp((1, 8, 8), num_classes=10)  # 64-128-10 with tanh; any supported model works
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
engine = dpclip.PrivacyEngine(
    model, optimizer, sample_size=len(train), batch_size=256,
    epochs=epochs, target_epsilon=3.0, target_delta=1e-5,
)  # fmt: skip

for epoch in range(epochs):
    model.train()
    for batch in engine.data_loader(train):  # Poisson-sampled logical batches
        for x, y in batch:  # physical batches (here one per logical batch)
            F.cross_entropy(model(x), y).backward()
        optimizer.step()  # clips per sample, adds noise once, records the step
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"epoch {epoch + 1}: test accuracy {accuracy:.1%}, ε = {engine.epsilon():.2f}")
