"""A tiny LLaMA-style decoder, built from a config with random weights.

It has LLaMA's parts and, above all, LLaMA's module names, so LoRA targets read
as they do on a real model (`q_proj k_proj v_proj o_proj gate_proj up_proj
down_proj lm_head`): RMSNorm, rotary position embeddings, grouped-query attention
with fewer key/value heads than query heads (so `k_proj` and `v_proj` are not
square), and a SwiGLU MLP. Touvron et al., 2023, https://arxiv.org/abs/2302.13971.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int = 40  # tokens
    hidden_size: int = 64  # model width d
    intermediate_size: int = 176  # SwiGLU width
    num_hidden_layers: int = 2  # decoder blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention)
    max_position_embeddings: int = 64  # longest sequence
    rope_theta: float = 10000.0  # rotary base
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    """x / rms(x) * weight (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * rms).to(x.dtype) * self.weight


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs of channels of x (batch, heads, seq, head_dim) by position-dependent angles."""
    seq, dim = x.shape[-2], x.shape[-1]
    freqs = theta ** (-torch.arange(0, dim, 2, device=x.device).float() / dim)  # (dim/2,)
    angles = torch.arange(seq, device=x.device).float()[:, None] * freqs  # (seq, dim/2)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # (seq, dim)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention: each key/value head serves several query heads."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        cfg, hd = self.cfg, self.cfg.head_dim
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, hd).transpose(1, 2)  # (b, H, t, hd)
        k = (
            self.k_proj(x).view(b, t, cfg.num_key_value_heads, hd).transpose(1, 2)
        )  # (b, Hkv, t, hd)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, hd).transpose(1, 2)
        q, k = rotary(q, cfg.rope_theta), rotary(k, cfg.rope_theta)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (b, H, t, hd)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, H, t, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (b, t, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))  # pre-norm residual blocks
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)  # (b, t, d)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TinyLlama(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab). Names follow transformers' Llama."""

    def __init__(self, cfg: LlamaConfig | None = None):
        super().__init__()
        self.config = cfg or LlamaConfig()
        self.model = LlamaModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        """The output head, which "all-linear" LoRA leaves out (as PEFT does)."""
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(ids))
