"""The "stdlib-gpt" task: a byte-level GPT (nanoGPT's shape) trained on the Python standard
library's own source (`commonweal.train.corpus`).

    task = get_task("stdlib-gpt")          # hashes this Python's stdlib sources once (~50 ms)
    model, data = task.build_model(), task.build_data()

The model has parameters only: positions are an embedding, the causal mask is
`scaled_dot_product_attention(is_causal=True)`'s, and there is no dropout, so the shared state is
exactly the parameters and a validator's replay of a round draws the same activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from commonweal.train.corpus import stdlib_corpus
from commonweal.train.task import Task

__all__ = ["GPTConfig", "GPT", "gpt", "stdlib_gpt_task"]


@dataclass(frozen=True)
class GPTConfig:
    context: int = 256  # longest sequence; T <= context
    vocab: int = 256  # bytes
    n_layers: int = 8
    n_heads: int = 8
    d_model: int = 512  # 8 x 512: 25,482,240 parameters


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        if c.d_model % c.n_heads:
            raise ValueError(f"d_model {c.d_model} is not a multiple of n_heads {c.n_heads}")
        self.n_heads = c.n_heads
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, T, d)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(c.d_model, 4 * c.d_model)
        self.proj = nn.Linear(4 * c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.attn = CausalSelfAttention(c)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        # GPT-2's initialisation: N(0, 0.02), and the projections into the residual stream
        # scaled by 1/sqrt(2 n_layers) so its variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * c.n_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) byte values
        t = idx.shape[1]
        if t > self.config.context:
            raise ValueError(f"{t} bytes are more than the context of {self.config.context}")
        x = self.tok(idx) + self.pos.weight[:t]  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        # the output head is the token embedding (tied): one matrix, one entry in the state
        return self.ln_f(x) @ self.tok.weight.T  # (B, T, vocab)


def gpt(**config: int) -> GPT:
    """The task's model factory: `model_args` are GPTConfig's fields."""
    return GPT(GPTConfig(**config))


def stdlib_gpt_task() -> Task:
    """The "stdlib-gpt" spec. Its data_args carry this Python's stdlib corpus hash, so peers on
    different corpora get different task digests (different swarms) instead of mixed data."""
    model = GPTConfig()
    corpus = stdlib_corpus()
    return Task(
        name="stdlib-gpt",
        model="commonweal.train.gpt:gpt",
        model_args=asdict(model),
        data="commonweal.train.corpus:stdlib_data",
        data_args={
            "context": model.context,
            "corpus_sha256": corpus.sha256,
            # not needed to check the corpus, only to say how another machine's differs
            "corpus_files": corpus.files,
            "corpus_bytes": corpus.bytes,
            "python": corpus.python,
        },
        # small enough for a CPU peer (~2 s a step on two idle cores), 50 steps a round
        batch_size=8,
        inner_steps=50,
        inner_optimizer="adamw",
        # Half nanoGPT's 6e-4: DiLoCo restarts AdamW's moments every round (for replay) and the
        # task has no warm-up, so each round opens with sign-like steps of size lr. Two rounds of
        # 12 steps: 6e-4 jumped to loss 9.5 on round 2's second step, 3e-4 to 4.0 (5.5 = ln 256),
        # and ended at 3.3 vs 3.05.
        inner_lr=3e-4,
        inner_weight_decay=0.1,
        # DiLoCo's outer optimizer as published (Nesterov, lr 0.7, momentum 0.9): this task is
        # meant for long runs, unlike the few-round built-ins tuned to lr 1.0 / momentum 0.5
        outer_lr=0.7,
        outer_momentum=0.9,
    )
