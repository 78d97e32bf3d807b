"""Shared by the PEFT parity tests: the base models both libraries adapt, and the tolerance.

Each test module builds its own bases with `make_bases()` (tests modify them in place, so
modules must not share the objects).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_edu.experiments import MLP

TOL = 1e-5  # relative, float32
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)  # fmt: skip
TARGETS = {"mlp": ["fc1", "fc2", "fc3"], "llama": ["q_proj", "k_proj", "v_proj", "down_proj"]}


def make_bases() -> dict:
    """A small MLP and a transformers LLaMA with random weights (seed 0)."""
    torch.manual_seed(0)
    mlp = MLP(d_in=8, d_hidden=32, d_out=4)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    return {"mlp": mlp, "llama": llama}
