"""PyTorch's fused scaled_dot_product_attention, with the backend chosen explicitly and reported.

Backends are tried in order flash -> memory-efficient -> math (the first that accepts the inputs on this
device runs); `last_backend` names the one that ran. GQA uses `enable_gqa=True` (no repeated K/V) where the
backend supports it; otherwise K/V are repeated as transformers does.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from impl import masks
from impl.gqa import groups, repeat_kv
from impl.projection import heads, output, project_qkv

ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
last_backend: str | None = None  # which backend the last call used, e.g. "FLASH_ATTENTION+gqa"


def core(q, k, v, *, causal=True, scale=None, attention_mask=None, order=ORDER):
    """The core contract: q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> (B, H, Sq, d); causal bottom-right + padding."""
    global last_backend
    g = groups(q.shape[1], k.shape[1])
    Sq, Sk = q.shape[2], k.shape[2]
    if attention_mask is None and (Sq == Sk or not causal):
        kw = {"is_causal": causal}  # lets flash kernels skip blocks; no mask tensor at all
        allowed = None
    else:
        allowed = masks.build(Sq, Sk, attention_mask, q.device, is_causal=causal)  # (B|1, 1, Sq, Sk) bool
        kw = {"attn_mask": allowed}
    kw["scale"] = scale
    errors = []
    for backend in order:
        for gqa in (True, False) if g > 1 else (False,):
            kk, vv = (k, v) if gqa or g == 1 else (repeat_kv(k, g), repeat_kv(v, g))
            try:
                with sdpa_kernel([backend]):
                    ctx = F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa, **kw)  # (B, H, Sq, d)
            except RuntimeError as e:  # this backend does not take these inputs here: try the next
                errors.append(f"{backend.name}{'+gqa' if gqa else ''}: {str(e).splitlines()[0][:80]}")
                continue
            last_backend = backend.name + ("+gqa" if gqa else "")
            if allowed is not None:  # rows that may attend to nothing: zeros (some kernels give NaN)
                ctx = ctx.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
            return ctx
    raise RuntimeError("no SDPA backend accepted these inputs: " + "; ".join(errors))


def attention(x, weights, *, config, position_ids, attention_mask=None):
    groups(*heads(config)[:2])
    q, k, v = project_qkv(x, weights, config, position_ids)  # (B, H, S, d), (B, Hkv, S, d) x2
    return output(core(q, k, v, attention_mask=attention_mask), weights)  # (B, S, D)
