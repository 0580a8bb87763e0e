"""Attention as a textbook pipeline whose every step can be swapped: the one place bugs are written.

One pipeline for every family (impl/layer.py's): what runs is read from the config and the weights.
    1. projection   q, k, v = x W^T (+ b where the weights have biases), split into heads (view + transpose); q/k
                    RMSNorm per head where the weights have q_norm/k_norm (Qwen3, Gemma 3); RoPE tables at
                    position_ids with the layer's rope parameters (partial rotary: the first rotary_dim channels)
    2. scores       each query head against its KV head (repeat_interleave), q k^T / sqrt(head_dim)
    3. mask/softmax causal + padding (1 = token), softmax over the keys, fully masked rows -> 0
                    (kernels, the core contract, also: the scores capped (softcap) after the scale, a sliding window
                    ANDed with the mask, one sink logit per query head in the softmax's denominator)
                    (layers: the same keywords, from the config and weights as impl/layer.py reads them: the
                    window on sliding layers, query_pre_attn_scalar's scale, attn_logit_softcapping, sinks)
    4. aggregation  probabilities @ v, merge heads, o_proj (+ its bias)

Built from impl/'s pieces. Every step works in the input's dtype with at least float32 for RoPE and the softmax,
so the same pipeline run in float64 is an exact reference, and a bug's steps run in float64 are the diagnosis's
suspect for that bug ("what would the output be if this were the mistake?").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from impl import layer as family
from impl import masks, rope
from impl.gqa import repeat_kv
from impl.projection import heads, linear, output, rms_norm, rope_tables, split_heads


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


def cap(s, softcap, scale):
    return softcap * torch.tanh(s / softcap)  # after the scale, before the mask (gemma2's order)


def window_keep(Sq, Sk, window):
    """(1, 1, Sq, Sk) bool: the window (left, right) as FlashAttention's window_size, -1 (or None) unbounded; the
    queries bottom-right aligned (query i at position Sk - Sq + i)."""
    p = torch.arange(Sq)[:, None] + (Sk - Sq)  # (Sq, 1)
    j = torch.arange(Sk)[None, :]  # (1, Sk)
    left, right = window
    keep = torch.ones(Sq, Sk, dtype=torch.bool)
    if left is not None and left >= 0:
        keep = keep & (p - j <= left)
    if right is not None and right >= 0:
        keep = keep & (j - p <= right)
    return keep[None, None]


def sink_of(sinks, H, Hkv):
    return sinks  # [H]: one logit per query head


def sink_softmax(s, allowed, sinks):
    """The softmax with one more logit per query head (sinks [H]) in the denominator and no value: gpt_oss's extra
    column, dropped after the softmax. Rows with no key: zeros."""
    col = sinks.to(s.dtype).reshape(1, -1, 1, 1)  # (1, H, 1, 1)
    s = s.masked_fill(~allowed, float("-inf"))
    m = torch.maximum(s.amax(dim=-1, keepdim=True), col)  # the sink joins the row max
    e = torch.exp(s - m)
    return e / (e.sum(dim=-1, keepdim=True) + torch.exp(col - m))


def aggregate(probs, v):
    return probs.to(v.dtype) @ v  # (B, H, S, d)


def project(x, w, name, n, d, split):
    return split(linear(x, w, name), n, d)  # (B, n, S, d), the bias added where w has `name.bias`


def norm(q, k, w, config):
    """q/k RMSNorm over each head's head_dim, before RoPE, where w has q_norm/k_norm; (1 + w) for Gemma."""
    if w.get("q_norm") is not None:
        q = rms_norm(q, w["q_norm"], config)
    if w.get("k_norm") is not None:
        k = rms_norm(k, w["k_norm"], config)
    return q, k


def keywords(config, w) -> dict:
    """The kernel's keywords for this layer: window, scale, softcap, sinks (impl/layer.py)."""
    return family.keywords(config, w)


@dataclass(frozen=True)
class Steps:
    project: Callable = project  # (x, w, name, n_heads, d, split) -> (B, n, S, d)
    split: Callable = split_heads  # (B, S, n*d) -> (B, n, S, d)
    norm: Callable = norm  # (q, k, w, config) -> q, k normed per head (where w has q_norm/k_norm)
    tables: Callable = tables  # (config, position_ids, dtype) -> cos, sin (B, S, rd)
    rotate: Callable = rotate  # (q, k, v, cos, sin) -> q, k, v
    expand: Callable = repeat_kv  # (k, g) -> (B, H, S, d)
    scores: Callable = scores  # (q, k, d) -> (B, H, S, S), float32 or wider
    allowed: Callable = allowed  # (Sq, Sk, attention_mask, causal) -> bool, True = may attend
    softmax: Callable = masks.masked_softmax  # (scores, allowed) -> probabilities
    cap: Callable = cap  # (scores, softcap, scale) -> capped scores (kernels given softcap)
    window: Callable = window_keep  # (Sq, Sk, window) -> bool, True = inside the window (kernels given window)
    sink_of: Callable = sink_of  # (sinks [H], H, Hkv) -> each query head's sink logit [H] (kernels given sinks)
    sink_softmax: Callable = sink_softmax  # (scores, allowed, sinks [H]) -> probabilities over the keys
    aggregate: Callable = aggregate  # (probs, v) -> (B, H, S, d)
    core: Callable | None = None  # replaces 2-3-aggregate (tiled bugs): (q, k, v, mask, causal, scale) -> ctx
    output: Callable = output  # (ctx, weights) -> (B, S, D)
    keywords: Callable = keywords  # (config, w) -> the kernel's window/scale/softcap/sinks for this layer


def pipeline(steps: Steps, x, w, *, config, position_ids, attention_mask=None):
    """The layer contract (impl/__init__.py) computed with `steps`."""
    H, Hkv, d = heads(config)
    # 1. projection, head split, RoPE
    q = steps.project(x, w, "q_proj", H, d, steps.split)  # (B, H, S, d)
    k = steps.project(x, w, "k_proj", Hkv, d, steps.split)  # (B, Hkv, S, d)
    v = steps.project(x, w, "v_proj", Hkv, d, steps.split)  # (B, Hkv, S, d)
    q, k = steps.norm(q, k, w, config)
    cos, sin = steps.tables(config, position_ids, acc(x))  # (B, S, rd)
    q, k, v = steps.rotate(q, k, v, cos, sin)
    ctx = kernel(steps, q, k, v, attention_mask=attention_mask, **steps.keywords(config, w))  # (B, H, S, d)
    # 4. merge heads, o_proj
    return steps.output(ctx, w)  # (B, S, D)


KERNEL_STEPS = {"expand", "scores", "allowed", "softmax", "aggregate", "core", "cap", "window", "sink_of",
                "sink_softmax"}  # what a core-contract kernel holds  # fmt: skip


def logits(steps: Steps, q, k, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0):
    """Stage 2 and 3's mask: (scores (B, H, Sq, Sk) scaled and capped, allowed (B|1, 1, Sq, Sk) bool), k already
    expanded to the query heads."""
    d = q.shape[-1]
    s = steps.scores(q, k, d)  # (B, H, Sq, Sk)
    if scale is not None:
        s = s * (scale * d**0.5)  # the scores step divides by sqrt(d): the caller's scale replaces it
    if softcap:
        s = steps.cap(s, softcap, d**-0.5 if scale is None else scale)
    keep = steps.allowed(q.shape[2], k.shape[2], attention_mask, causal)
    if window is not None:
        keep = keep & steps.window(q.shape[2], k.shape[2], window)
    return s, keep


def kernel(steps: Steps, q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0,
           sinks=None):  # fmt: skip
    """Stages 2-4 up to the context, the core contract (impl/__init__.py): q (B, H, Sq, d), k/v (B, Hkv, Sk, d);
    window, softcap and sinks as harness/verify/contracts/core.py states them."""
    H, Hkv = q.shape[1], k.shape[1]
    if steps.core is not None:
        if window is not None or softcap or sinks is not None:
            raise TypeError("the tiled loop takes no window, softcap or sinks")  # never a suspect for them
        return steps.core(q, k, v, attention_mask, causal, scale)
    # 2. scores, 3. mask and softmax
    k, v = steps.expand(k, H // Hkv), steps.expand(v, H // Hkv)  # (B, H, Sk, d)
    s, keep = logits(steps, q, k, causal=causal, scale=scale, attention_mask=attention_mask, window=window,
                     softcap=softcap)  # fmt: skip
    if sinks is None:
        p = steps.softmax(s, keep)  # (B, H, Sq, Sk)
    else:
        p = steps.sink_softmax(s, keep, steps.sink_of(sinks, H, Hkv))
    # 4. aggregation
    return steps.aggregate(p, v)  # (B, H, Sq, d)


def core(steps: Steps | None = None, **changes) -> Callable:
    """A core-contract kernel computing stages 2-4 with `steps` and `changes` swapped in."""
    steps = replace(steps or Steps(), **changes)

    def attn(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None):
        return kernel(steps, q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, window=window,
                      softcap=softcap, sinks=sinks)  # fmt: skip

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
