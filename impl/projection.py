"""Stage 1: projections (with their biases), head split, per-head q/k norms and RoPE; and the last stage's head merge
+ output projection (with its bias).

Shapes: x (B, S, D) -> q (B, H, S, d), k and v (B, Hkv, S, d), q and k normed (where the family has q_norm/k_norm)
then rotated. The families differ only in which weights they have (impl/__init__.py lists the names):
- biases: q/k/v (Qwen2), q/k/v/o (GPT-OSS): y = x W^T + b, in the input dtype as nn.Linear computes it.
- q_norm/k_norm (Qwen3, Gemma 3): an RMSNorm over head_dim, each head on its own ("unlike olmo, only on the head
  dim!", transformers' Qwen3 says: OLMo-2 normalises all heads at once), before RoPE. Its weight is applied as the
  family's RMSNorm applies it: Qwen3 (Llama's RMSNorm) w * (x / rms) with x / rms back in the dtype first; Gemma
  (1 + w) * (x / rms) in float32, the product back in the dtype (Gemma stores w around 0, so 1 + w is the gain).
For half-precision inputs the projections run in the input dtype (as the model does), the norms and RoPE in float32,
then back to the input dtype; float64 inputs run everything in float64 (an exact reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from impl import rope

# model_types whose RMSNorm multiplies by (1 + w): transformers' Gemma, Gemma 2, Gemma 3 (and its text model) and
# VaultGemma. Every other family multiplies by w.
ONE_PLUS_W = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "vaultgemma"})


def heads(config: dict) -> tuple[int, int, int]:
    """(H, Hkv, d)."""
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    return H, Hkv, rope.dims(config)[0]


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and RoPE run in: float32 for half precision and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def split_heads(t: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(B, S, n*d) -> (B, n, S, d)."""
    B, S, _ = t.shape
    return t.view(B, S, n, d).transpose(1, 2)  # (B, n, S, d)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, n, S, d) -> (B, S, n*d)."""
    B, n, S, d = t.shape
    return t.transpose(1, 2).reshape(B, S, n * d)  # (B, S, n*d)


def linear(x: torch.Tensor, weights: dict, name: str, rows: slice = slice(None)) -> torch.Tensor:
    """x W^T (+ b where weights has `name.bias`), for the output rows `rows` of W (a head's slice; all by default).
    One fused addmm with the bias, as nn.Linear computes it: in bfloat16 a separate `+ b` rounds twice."""
    b = weights.get(name + ".bias")
    return F.linear(x, weights[name][rows], None if b is None else b[rows])  # (..., out)


def rms_norm(t: torch.Tensor, w: torch.Tensor, config: dict) -> torch.Tensor:
    """RMSNorm over the last dim (head_dim: each head on its own), eps = config["rms_norm_eps"], as the family's
    own RMSNorm computes it (the module docstring): (1 + w) for the model_types in ONE_PLUS_W, w otherwise."""
    eps = config.get("rms_norm_eps", 1e-6)
    n = t.to(wide(t.dtype))
    n = n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + eps)  # x / rms(x), in float32 (float64)
    if config.get("model_type") in ONE_PLUS_W:
        return (n * (1.0 + w.to(n.dtype))).to(t.dtype)  # Gemma: the gain in float32, then the dtype
    return w * n.to(t.dtype)  # Qwen3 / Llama: back to the dtype, then the gain


def rope_tables(config: dict, position_ids: torch.Tensor, dtype=torch.float32):
    """cos, sin (B, S, rotary_dim) for these positions (float32 angles; float64 for references), with this layer's
    rope parameters (rope.layer_rope: Gemma 3's differ by layer type)."""
    seq_len = int(position_ids.max()) + 1 if position_ids.numel() else None  # "dynamic" and "longrope" use it
    inv, scaling = rope.inv_freq(config, seq_len=seq_len, dtype=dtype)
    return rope.cos_sin(inv.to(position_ids.device), position_ids, scaling, dtype=dtype)


def project_qkv(x: torch.Tensor, weights: dict, config: dict, position_ids: torch.Tensor, *, interleaved=False):
    """x (B, S, D) -> q (B, H, S, d), k (B, Hkv, S, d) normed and rotated, v (B, Hkv, S, d)."""
    H, Hkv, d = heads(config)
    q = split_heads(linear(x, weights, "q_proj"), H, d)  # (B, H, S, d)
    k = split_heads(linear(x, weights, "k_proj"), Hkv, d)  # (B, Hkv, S, d)
    v = split_heads(linear(x, weights, "v_proj"), Hkv, d)  # (B, Hkv, S, d)
    if weights.get("q_norm") is not None:  # per head, before RoPE (Qwen3, Gemma 3)
        q = rms_norm(q, weights["q_norm"], config)
    if weights.get("k_norm") is not None:
        k = rms_norm(k, weights["k_norm"], config)
    acc = wide(x.dtype)
    cos, sin = rope_tables(config, position_ids, dtype=acc)  # (B, S, rd)
    apply = rope.apply_interleaved if interleaved else rope.apply_half  # both rotate only the first rd channels
    q = apply(q.to(acc), cos, sin).to(x.dtype)
    k = apply(k.to(acc), cos, sin).to(x.dtype)
    return q, k, v


def output(ctx: torch.Tensor, weights: dict) -> torch.Tensor:
    """Context (B, H, S, d) -> merged heads (B, S, H*d) -> o_proj (+ its bias) -> (B, S, D)."""
    return linear(merge_heads(ctx), weights, "o_proj")
