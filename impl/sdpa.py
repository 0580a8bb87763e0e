"""PyTorch's fused scaled_dot_product_attention, with the backend chosen explicitly and reported.

Backends are tried in order flash -> memory-efficient -> math (the first that accepts the inputs on this
device runs); `last_backend` names the one that ran. GQA uses `enable_gqa=True` (no repeated K/V) where the
backend supports it; otherwise K/V are repeated as transformers does.

What torch's function can express, and what it cannot (the fallback rules, in the order they apply):
- plain causal (Sq = Sk or not causal), no padding, window or sinks: `is_causal`, no mask tensor at all.
- padding, a window, or causal with Sq != Sk (bottom-right; torch's is_causal is top-left): an explicit boolean
  mask (B|1, 1, Sq, Sk).
- sinks: a sink is one more key whose score is the sink logit and whose value is zero. K and V get a zero row
  (its score q . 0 = 0) and the mask becomes additive, (B|1, H, Sq, Sk + 1): 0 / -inf over the keys, the head's
  sink logit in the extra column (a float32 mask whatever q's dtype: torch takes it, and the sinks stay float32).
  Where the sinks need a gradient the mask does too, which the fused CPU kernels refuse: the math backend runs
  then (last_backend says so).
- softcap: torch's function has no way to change the scores before the softmax: naive.core runs instead
  (the same keywords), and last_backend is "naive (softcap)".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from impl import layer, masks, naive
from impl.gqa import groups, repeat_kv

ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
SOFTCAP_FALLBACK = "naive (softcap)"  # last_backend when softcap made naive.core run instead
last_backend: str | None = None  # which backend the last call used, e.g. "FLASH_ATTENTION+gqa"


def with_sink_column(k, v, allowed, sinks):
    """k, v (B, Hkv, Sk, d) and allowed (B|1, 1, Sq, Sk) bool -> k, v with a zero key/value row appended
    (B, Hkv, Sk + 1, d), and the additive mask (B|1, H, Sq, Sk + 1): 0 / -inf, then the sink logit of each head."""
    zero = k.new_zeros(k.shape[:2] + (1, k.shape[-1]))  # (B, Hkv, 1, d)
    k, v = torch.cat((k, zero), dim=2), torch.cat((v, zero), dim=2)  # (B, Hkv, Sk + 1, d) each
    wide = torch.promote_types(k.dtype, torch.float32)  # the sinks stay float32 (float64 for float64 inputs)
    bias = torch.zeros(allowed.shape, dtype=wide, device=k.device).masked_fill_(~allowed, float("-inf"))
    H, Sq = sinks.shape[0], allowed.shape[2]
    bias = bias.expand(-1, H, -1, -1)  # (B|1, H, Sq, Sk): the same mask for every head
    sink = sinks.to(k.device, wide).view(1, H, 1, 1).expand(bias.shape[0], H, Sq, 1)  # (B|1, H, Sq, 1)
    return k, v, torch.cat((bias, sink), dim=-1)  # (B|1, H, Sq, Sk + 1)


def core(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None,
         order=ORDER):
    """The core contract: q (B, H, Sq, d), k/v (B, Hkv, Sk, d) -> (B, H, Sq, d); causal bottom-right + padding,
    window, sinks through torch's function; softcap through naive.core (see the module docstring)."""
    global last_backend
    g = groups(q.shape[1], k.shape[1])
    masks.check_sinks(sinks, q.shape[1])
    if softcap:
        last_backend = SOFTCAP_FALLBACK
        return naive.core(q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, window=window,
                          softcap=softcap, sinks=sinks)  # fmt: skip
    Sq, Sk = q.shape[2], k.shape[2]
    if attention_mask is None and window is None and sinks is None and (Sq == Sk or not causal):
        kw = {"is_causal": causal}  # lets flash kernels skip blocks; no mask tensor at all
        allowed = None
    else:
        allowed = masks.build(Sq, Sk, attention_mask, q.device, is_causal=causal, window=window)  # (B|1, 1, Sq, Sk)
        kw = {"attn_mask": allowed}
        if sinks is not None:
            k, v, kw["attn_mask"] = with_sink_column(k, v, allowed, sinks)  # Sk + 1 keys, an additive mask
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
    """The plug-in contract: the one layer (impl/layer.py) around this core."""
    return layer.attention(core, x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)
