"""Per-head attention in a Python loop: the readable version that production code vectorises.

For each query head h: its rows of Wq (and of the q bias), the KV head h // g it shares, the per-head q/k norm, RoPE,
scores, the layer's window / scale / softcap / sink, mask, softmax, context; then the heads are concatenated and
projected by Wo (+ its bias). Same arithmetic as `naive`, one head at a time; the family's pieces come from the
config and weights as in every built-in (impl/layer.py).
"""

from __future__ import annotations

import torch

from impl import masks
from impl.gqa import groups
from impl.layer import keywords
from impl.projection import heads, linear, rms_norm, rope_tables, wide
from impl.rope import apply_half


def head(q, k, v, allowed, scale, softcap=0.0, sink=None):
    """One query head: q (B, Sq, d) against its KV head k, v (B, Sk, d) -> context (B, Sq, d).

    Scores in float32 (float64 for float64 inputs), capped, then masked (allowed (B|1, Sq, Sk)) and softmaxed with
    this head's sink logit (a 0-d tensor, or None) in the denominator.
    """
    scores = (q @ k.transpose(-2, -1)).to(wide(q.dtype)) * scale  # (B, Sq, Sk)
    probs = masks.masked_softmax(masks.cap(scores, softcap), allowed, sink)  # (B, Sq, Sk)
    return probs.to(v.dtype) @ v  # (B, Sq, d)


def core(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None):
    """The core contract: q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> context (B, H, Sq, d), one query head at a time."""
    g = groups(q.shape[1], k.shape[1])
    masks.check_sinks(sinks, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = masks.build(q.shape[2], k.shape[2], attention_mask, q.device, is_causal=causal, window=window)
    allowed = allowed[:, 0]  # (B|1, Sq, Sk)
    contexts = []
    for h in range(q.shape[1]):
        sink = None if sinks is None else sinks[h].to(q.device, wide(q.dtype))  # () : this head's sink logit
        contexts.append(head(q[:, h], k[:, h // g], v[:, h // g], allowed, scale, softcap, sink))  # (B, Sq, d)
    return torch.stack(contexts, dim=1)  # (B, H, Sq, d)


def attention(x, weights, *, config, position_ids, attention_mask=None):
    H, Hkv, d = heads(config)
    g = groups(H, Hkv)
    B, S, _ = x.shape
    kw = keywords(config, weights)  # window, scale, softcap, sinks where the family sets them
    scale, sinks = kw.get("scale", d**-0.5), kw.get("sinks")
    acc = wide(x.dtype)
    cos, sin = rope_tables(config, position_ids, dtype=acc)  # (B, S, rd)
    allowed = masks.build(S, S, attention_mask, x.device, window=kw.get("window"))[:, 0]  # (B|1, S, S)

    def project(name, i):  # head i of q, k or v: its d rows of W (and of the bias), normed where the family does
        t = linear(x, weights, f"{name}_proj", slice(i * d, (i + 1) * d))  # (B, S, d)
        norm = weights.get(f"{name}_norm")
        return t if norm is None else rms_norm(t, norm, config)

    def rotate(t):  # (B, S, d) -> rotated (B, S, d), in float32 (float64) then back
        return apply_half(t.to(acc)[:, None], cos, sin)[:, 0].to(x.dtype)

    contexts = []
    for h in range(H):
        j = h // g  # the KV head serving query head h
        sink = None if sinks is None else sinks[h].to(x.device, acc)  # () : this head's sink logit
        q, k, v = rotate(project("q", h)), rotate(project("k", j)), project("v", j)  # (B, S, d) each
        contexts.append(head(q, k, v, allowed, scale, kw.get("softcap", 0.0), sink))  # (B, S, d)
    ctx = torch.cat(contexts, dim=-1)  # (B, S, H*d): heads side by side, as in merge_heads
    return linear(ctx, weights, "o_proj")  # (B, S, D)
