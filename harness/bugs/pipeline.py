"""Llama attention as a textbook pipeline whose every step can be swapped: the one place bugs are written.

    1. projection   q, k, v = x W^T, split into heads (view + transpose); RoPE tables at position_ids; rotate q, k
    2. scores       each query head against its KV head (repeat_interleave), q k^T / sqrt(head_dim)
    3. mask/softmax causal + padding (1 = token), softmax over the keys, fully masked rows -> 0
    4. aggregation  probabilities @ v, merge heads, o_proj

Built from impl/'s pieces. Every step works in the input's dtype with at least float32 for RoPE and the softmax,
so the same pipeline run in float64 is an exact reference, and a bug's steps run in float64 are the diagnosis's
suspect for that bug ("what would the output be if this were the mistake?").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from impl import masks, rope
from impl.gqa import repeat_kv
from impl.projection import heads, output, rope_tables, split_heads


def acc(t: torch.Tensor) -> torch.dtype:
    """The dtype RoPE and the softmax run in: float32 for half precision, the input's own otherwise."""
    return torch.promote_types(t.dtype, torch.float32)


def tables(config: dict, position_ids: torch.Tensor, dtype: torch.dtype):
    return rope_tables(config, position_ids, dtype=dtype)  # cos, sin (B, S, rd)


def rotate(q, k, v, cos, sin):
    return rot(q, cos, sin), rot(k, cos, sin), v


def rot(x, cos, sin, apply=rope.apply_half):
    """One tensor (B, n, S, d) rotated by RoPE in the tables' dtype, back in its own (`apply` picks the pairing)."""
    return apply(x.to(cos.dtype), cos, sin).to(x.dtype)


def scores(q, k, d):
    return (q @ k.transpose(-2, -1)).to(acc(q)) * d**-0.5  # (B, H, Sq, Sk)


def allowed(Sq, Sk, attention_mask, causal=True):
    return masks.build(Sq, Sk, attention_mask, is_causal=causal)  # (B|1, 1, Sq, Sk) bool, True = may attend


def aggregate(probs, v):
    return probs.to(v.dtype) @ v  # (B, H, S, d)


def project(x, w, name, n, d, split):
    return split(x @ w[name].T, n, d)  # (B, n, S, d)


@dataclass(frozen=True)
class Steps:
    project: Callable = project  # (x, w, name, n_heads, d, split) -> (B, n, S, d)
    split: Callable = split_heads  # (B, S, n*d) -> (B, n, S, d)
    tables: Callable = tables  # (config, position_ids, dtype) -> cos, sin (B, S, rd)
    rotate: Callable = rotate  # (q, k, v, cos, sin) -> q, k, v
    expand: Callable = repeat_kv  # (k, g) -> (B, H, S, d)
    scores: Callable = scores  # (q, k, d) -> (B, H, S, S), float32 or wider
    allowed: Callable = allowed  # (Sq, Sk, attention_mask, causal) -> bool, True = may attend
    softmax: Callable = masks.masked_softmax  # (scores, allowed) -> probabilities
    aggregate: Callable = aggregate  # (probs, v) -> (B, H, S, d)
    core: Callable | None = None  # replaces 2-3-aggregate (tiled bugs): (q, k, v, mask, causal, scale) -> ctx
    output: Callable = output  # (ctx, weights) -> (B, S, D)


def pipeline(steps: Steps, x, w, *, config, position_ids, attention_mask=None):
    """The layer contract (impl/__init__.py) computed with `steps`."""
    H, Hkv, d = heads(config)
    # 1. projection, head split, RoPE
    q = steps.project(x, w, "q_proj", H, d, steps.split)  # (B, H, S, d)
    k = steps.project(x, w, "k_proj", Hkv, d, steps.split)  # (B, Hkv, S, d)
    v = steps.project(x, w, "v_proj", Hkv, d, steps.split)  # (B, Hkv, S, d)
    cos, sin = steps.tables(config, position_ids, acc(x))  # (B, S, rd)
    q, k, v = steps.rotate(q, k, v, cos, sin)
    ctx = kernel(steps, q, k, v, attention_mask=attention_mask)  # (B, H, S, d)
    # 4. merge heads, o_proj
    return steps.output(ctx, w)  # (B, S, D)


KERNEL_STEPS = {"expand", "scores", "allowed", "softmax", "aggregate", "core"}  # what a core-contract kernel holds


def kernel(steps: Steps, q, k, v, *, causal=True, scale=None, attention_mask=None):
    """Stages 2-4 up to the context, the core contract (impl/__init__.py): q (B, H, Sq, d), k/v (B, Hkv, Sk, d)."""
    H, Hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if steps.core is not None:
        return steps.core(q, k, v, attention_mask, causal, scale)
    # 2. scores
    k, v = steps.expand(k, H // Hkv), steps.expand(v, H // Hkv)  # (B, H, Sk, d)
    s = steps.scores(q, k, d)  # (B, H, Sq, Sk)
    if scale is not None:
        s = s * (scale * d**0.5)  # the scores step divides by sqrt(d): the caller's scale replaces it
    # 3. mask and softmax
    p = steps.softmax(s, steps.allowed(q.shape[2], k.shape[2], attention_mask, causal))  # (B, H, Sq, Sk)
    # 4. aggregation
    return steps.aggregate(p, v)  # (B, H, Sq, d)


def core(steps: Steps | None = None, **changes) -> Callable:
    """A core-contract kernel computing stages 2-4 with `steps` and `changes` swapped in."""
    steps = replace(steps or Steps(), **changes)

    def attn(q, k, v, *, causal=True, scale=None, attention_mask=None):
        return kernel(steps, q, k, v, causal=causal, scale=scale, attention_mask=attention_mask)

    return attn


def layer(steps: Steps | None = None, **changes) -> Callable:
    """A layer-contract function computing the pipeline with `steps` (default: correct) and `changes` swapped in."""
    steps = replace(steps or Steps(), **changes)

    def attention(x, weights, *, config, position_ids, attention_mask=None):
        return pipeline(steps, x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)

    return attention


def float64(fn: Callable, x, weights, position_ids, attention_mask, config) -> torch.Tensor:
    """fn (layer contract) on float64 copies of the inputs: a pipeline's exact value, no float32 rounding."""
    with torch.no_grad():
        w = {n: t.double() for n, t in weights.items()}
        return fn(x.double(), w, config=config, position_ids=position_ids, attention_mask=attention_mask)
