"""Stage 1: projections, head split and RoPE; and the last stage's head merge + output projection.

Shapes: x (B, S, D) -> q (B, H, S, d), k and v (B, Hkv, S, d), q and k rotated. For half-precision inputs the
projections run in the input dtype (as the model does) and RoPE in float32, then back to the input dtype.
"""

from __future__ import annotations

import torch

from impl import rope


def heads(config: dict) -> tuple[int, int, int]:
    """(H, Hkv, d)."""
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    return H, Hkv, rope.dims(config)[0]


def split_heads(t: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(B, S, n*d) -> (B, n, S, d)."""
    B, S, _ = t.shape
    return t.view(B, S, n, d).transpose(1, 2)  # (B, n, S, d)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, n, S, d) -> (B, S, n*d)."""
    B, n, S, d = t.shape
    return t.transpose(1, 2).reshape(B, S, n * d)  # (B, S, n*d)


def rope_tables(config: dict, position_ids: torch.Tensor, dtype=torch.float32):
    """cos, sin (B, S, rotary_dim) for these positions (float32 angles; float64 for references)."""
    seq_len = int(position_ids.max()) + 1 if position_ids.numel() else None  # only "dynamic" uses it
    inv, scaling = rope.inv_freq(config, seq_len=seq_len, dtype=dtype)
    return rope.cos_sin(inv.to(position_ids.device), position_ids, scaling, dtype=dtype)


def project_qkv(x: torch.Tensor, weights: dict, config: dict, position_ids: torch.Tensor, *, interleaved=False):
    """x (B, S, D) -> q (B, H, S, d), k (B, Hkv, S, d) rotated, v (B, Hkv, S, d)."""
    H, Hkv, d = heads(config)
    q = split_heads(x @ weights["q_proj"].T, H, d)  # (B, H, S, d)
    k = split_heads(x @ weights["k_proj"].T, Hkv, d)  # (B, Hkv, S, d)
    v = split_heads(x @ weights["v_proj"].T, Hkv, d)  # (B, Hkv, S, d)
    cos, sin = rope_tables(config, position_ids)
    apply = rope.apply_interleaved if interleaved else rope.apply_half
    q = apply(q.float(), cos, sin).to(x.dtype)
    k = apply(k.float(), cos, sin).to(x.dtype)
    return q, k, v


def output(ctx: torch.Tensor, weights: dict) -> torch.Tensor:
    """Context (B, H, S, d) -> merged heads (B, S, H*d) -> o_proj -> (B, S, D)."""
    return merge_heads(ctx) @ weights["o_proj"].T
