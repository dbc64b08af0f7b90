"""A LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, causal SDPA attention (GQA-ready), untied
embeddings, no biases — K2's architecture. Pure nn.Module: no torch.distributed here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    activation_checkpointing: bool = False

    @classmethod
    def from_config(cls, m) -> ModelArgs:  # noqa: ANN001 - a schema.ModelConfig
        return cls(
            n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
            ffn_dim=m.ffn_dim, vocab_size=m.vocab_size, max_seq_len=m.max_seq_len,
            rope_theta=m.rope_theta, norm_eps=m.norm_eps, init_std=m.init_std,
            activation_checkpointing=m.activation_checkpointing,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """cos/sin tables of shape (seq_len, head_dim // 2), computed in fp32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]); x is (B, H, T, D)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[: x.shape[-2]], sin[: x.shape[-2]]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = a.n_heads, a.n_kv_heads
        self.head_dim = a.d_model // a.n_heads
        self.wq = nn.Linear(a.d_model, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.d_model, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.d_model, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(a.d_model, a.ffn_dim, bias=False)
        self.w2 = nn.Linear(a.ffn_dim, a.d_model, bias=False)
        self.w3 = nn.Linear(a.d_model, a.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(a.d_model, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.d_model, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.d_model)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.d_model, a.norm_eps)
        self.output = nn.Linear(a.d_model, a.vocab_size, bias=False)  # untied, as in K2
        cos, sin = rope_tables(a.max_seq_len, a.d_model // a.n_heads, a.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) for matrices, std / sqrt(2 * n_layers) for residual outputs."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight")):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V) in fp32."""
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos, self.rope_sin
        for layer in self.layers:
            if self.args.activation_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        return self.output(self.norm(h)).float()


def token_losses(logits: torch.Tensor, targets: torch.Tensor,
                 with_logz: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token cross-entropy (fused kernel, differentiable) and log-partition log Z (a
    statistic only: computed without autograd so it costs no backward pass; None when not
    asked for)."""
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)
    if not with_logz:
        return loss, None
    with torch.no_grad():  # CE = log Z - logit[target], so log Z is one gather away (no 2nd vocab pass)
        lse = loss.detach().float() + logits.detach().gather(-1, targets[..., None]).squeeze(-1).float()
    return loss, lse


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
