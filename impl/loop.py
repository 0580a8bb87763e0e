"""Per-head attention in a Python loop: the readable version that production code vectorises.

For each query head h: its slice of Wq, the KV head h // g it shares, RoPE, scores, mask, softmax, context;
then the heads are concatenated and projected by Wo. Same arithmetic as `naive`, one head at a time.
"""

from __future__ import annotations

import torch

from impl import masks
from impl.gqa import groups
from impl.projection import heads, rope_tables
from impl.rope import apply_half


def core(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None):
    """The core contract: q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> context (B, H, Sq, d), one query head at a time."""
    g = groups(q.shape[1], k.shape[1])
    masks.check_sinks(sinks, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    wide = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    allowed = masks.build(q.shape[2], k.shape[2], attention_mask, q.device, is_causal=causal, window=window)
    allowed = allowed[:, 0]  # (B|1, Sq, Sk)
    contexts = []
    for h in range(q.shape[1]):
        scores = (q[:, h] @ k[:, h // g].transpose(-2, -1)).to(wide) * scale  # (B, Sq, Sk)
        scores = masks.cap(scores, softcap)
        sink = None if sinks is None else sinks[h].to(q.device, wide)  # () : this head's sink logit
        probs = masks.masked_softmax(scores, allowed, sink)  # (B, Sq, Sk)
        contexts.append(probs.to(v.dtype) @ v[:, h // g])  # (B, Sq, d)
    return torch.stack(contexts, dim=1)  # (B, H, Sq, d)


def attention(x, weights, *, config, position_ids, attention_mask=None):
    H, Hkv, d = heads(config)
    g = groups(H, Hkv)
    B, S, _ = x.shape
    cos, sin = rope_tables(config, position_ids)  # (B, S, rd)
    allowed = masks.build(S, S, attention_mask, x.device)[:, 0]  # (B|1, S, S)

    def rotate(t):  # (B, S, d) -> rotated (B, S, d), in float32 then back
        return apply_half(t.float()[:, None], cos, sin)[:, 0].to(x.dtype)

    contexts = []
    for h in range(H):
        j = h // g  # the KV head serving query head h
        q = rotate(x @ weights["q_proj"][h * d : (h + 1) * d].T)  # (B, S, d)
        k = rotate(x @ weights["k_proj"][j * d : (j + 1) * d].T)  # (B, S, d)
        v = x @ weights["v_proj"][j * d : (j + 1) * d].T  # (B, S, d)
        scores = (q @ k.transpose(-2, -1)).float() * d**-0.5  # (B, S, S)
        probs = masks.masked_softmax(scores, allowed)  # (B, S, S)
        contexts.append(probs.to(v.dtype) @ v)  # (B, S, d)
    ctx = torch.cat(contexts, dim=-1)  # (B, S, H*d): heads side by side, as in merge_heads
    return ctx @ weights["o_proj"].T  # (B, S, D)
