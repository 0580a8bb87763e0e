"""transformers' own attention functions wrapped as `--core` kernels (tests/test_kernel_variants.py, test_boundary.py):
they must pass the kernel matrix's window, softcap and sinks scenarios, which tests the harness's reference from the
outside. Written as a user would, independently of the harness: the window mask straight from the contract's
definition (p - left <= j <= p + right), not from masking_utils.

    eager_window      llama's eager_attention_forward with a window mask
    gemma2_softcap    gemma2's eager_attention_forward (softcap), window mask
    gpt_oss_sinks     gpt_oss's eager_attention_forward (module.sinks), window mask; returns lse too (sink included)
    hf_all            all three through **features: softcap and sinks together as gpt_oss's function with the cap
                      folded into its additive mask (another composition than the harness's); asserts that every
                      keyword it gets is set (the harness passes a keyword only when the scenario uses it)
    no_keywords       plain attention, no window/softcap/sinks in its signature: those scenarios are skipped
    claims_window     its __signature__ says it takes `window`; it does not (a lying signature: its own verdict)
"""

import inspect

import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager


def _module(q, k, sinks=None):
    m = torch.nn.Module()
    m.num_key_value_groups, m.training, m.head_dim = q.shape[1] // k.shape[1], False, q.shape[-1]
    m.sinks = sinks
    return m


def _keep(q, k, causal, attention_mask, window):
    """(B|1, 1, Sq, Sk) bool from the contract: positions bottom-right aligned, window (left, right), -1 unbounded."""
    Sq, Sk = q.shape[2], k.shape[2]
    p = torch.arange(Sq)[:, None] + (Sk - Sq)
    j = torch.arange(Sk)[None, :]
    keep = j <= p if causal else torch.ones(Sq, Sk, dtype=torch.bool)
    if window is not None:
        left, right = window
        if left is not None and left >= 0:
            keep = keep & (j >= p - left)
        if right is not None and right >= 0:
            keep = keep & (j <= p + right)
    keep = keep[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]
    return keep


def _bias(keep, dtype):
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def _check_window(window):
    if not (isinstance(window, tuple) and len(window) == 2 and all(type(w) is int for w in window)):
        raise TypeError(f"window must arrive as a pair of ints, got {window!r}")


def eager_window(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None):
    if window is not None:
        _check_window(window)
    bias = _bias(_keep(q, k, causal, attention_mask, window), q.dtype)
    return llama_eager(_module(q, k), q, k, v, bias, scaling=_scale(q, scale))[0].transpose(1, 2)


def gemma2_softcap(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0):
    bias = _bias(_keep(q, k, causal, attention_mask, window), q.dtype)
    out = gemma2_eager(_module(q, k), q, k, v, bias, scaling=_scale(q, scale), softcap=softcap or None)[0]
    return out.transpose(1, 2)


def gpt_oss_sinks(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, sinks=None):
    H = q.shape[1]
    if sinks is not None and (sinks.dtype != torch.float32 or tuple(sinks.shape) != (H,)):
        raise TypeError(f"sinks must be float32 [{H}], got {sinks.dtype} {list(sinks.shape)}")
    s = torch.full((H,), float("-inf")) if sinks is None else sinks
    keep = _keep(q, k, causal, attention_mask, window)
    out = gpt_oss_eager(_module(q, k, s), q, k, v, _bias(keep, q.dtype), scaling=_scale(q, scale))[0]
    g = H // k.shape[1]
    sc = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-2, -1)) * _scale(q, scale)
    sc = torch.cat([sc.masked_fill(~keep, float("-inf")), s.reshape(1, H, 1, 1).expand(*sc.shape[:3], 1)], -1)
    return out.transpose(1, 2), torch.logsumexp(sc, -1)  # lse: the whole denominator, the sink included


def hf_all(q, k, v, *, causal=True, scale=None, attention_mask=None, **features):
    unset = [n for n, x in features.items() if x is None or (n == "softcap" and not x)]
    if unset or not set(features) <= {"window", "softcap", "sinks"}:
        raise TypeError(f"passed keywords the scenario does not use, or unknown ones: {sorted(features)}")
    window, softcap, sinks = features.get("window"), features.get("softcap"), features.get("sinks")
    if window is not None:
        _check_window(window)
    keep = _keep(q, k, causal, attention_mask, window)
    sc_ = _scale(q, scale)
    if softcap and sinks is not None:  # gpt_oss's function; gemma2's cap as an additive correction of its scores
        s = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-2, -1)) * sc_  # as gpt_oss computes
        bias = _bias(keep, torch.float32) + (softcap * torch.tanh(s.float() / softcap) - s.float())
        out = gpt_oss_eager(_module(q, k, sinks), q, k, v, bias, scaling=sc_)[0]
    elif softcap:
        out = gemma2_eager(_module(q, k), q, k, v, _bias(keep, q.dtype), scaling=sc_, softcap=softcap)[0]
    elif sinks is not None:
        out = gpt_oss_eager(_module(q, k, sinks), q, k, v, _bias(keep, q.dtype), scaling=sc_)[0]
    else:
        out = llama_eager(_module(q, k), q, k, v, _bias(keep, q.dtype), scaling=sc_)[0]
    return out.transpose(1, 2).to(q.dtype)


def no_keywords(q, k, v, *, causal=True, scale=None, attention_mask=None):
    return eager_window(q, k, v, causal=causal, scale=scale, attention_mask=attention_mask)


def claims_window(q, k, v, *, causal=True, scale=None, attention_mask=None):
    return eager_window(q, k, v, causal=causal, scale=scale, attention_mask=attention_mask)


claims_window.__signature__ = inspect.Signature(
    [*inspect.signature(no_keywords).parameters.values(),
     inspect.Parameter("window", inspect.Parameter.KEYWORD_ONLY, default=None)])  # fmt: skip
