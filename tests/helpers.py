"""Test helpers (plain functions, no fixtures): where things are, tiny models, synthetic Hessians."""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OAC_SHARED", ROOT.parent / "shared")).resolve()


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0, **kw):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=32, **kw)
    return OPTForCausalLM(cfg).eval()


def correlated_H(d_in, n=None, seed=0):
    """A positive-definite Hessian 2XᵀX/n from correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * d_in
    mix = torch.eye(d_in) + 0.4 * torch.randn(d_in, d_in, generator=g) / d_in**0.5
    X = torch.randn(n, d_in, generator=g) @ mix * (0.2 + 2 * torch.rand(d_in, generator=g))
    return 2 * X.T @ X / n
