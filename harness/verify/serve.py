"""How the built-in contracts call the code under test: the functions a worker runs (contracts name them in SERVE).

They live apart from their contracts so that a worker imports torch and the user's code, not the judge
(transformers, the references, the diagnosis): a worker starts in the time torch takes to import. Each takes
(code, header, tensors, state): tensors already on the implementation's device; state holds the weights sent once
per key (pristine: every call copies them), their config, and what a module contract built from them.
"""

from __future__ import annotations

import json

import torch

GRAD_OF = ("x", "q_proj", "k_proj", "v_proj", "o_proj")  # a layer's gradients, in the order they travel


def _weights(header: dict, state: dict) -> tuple[dict, dict]:
    key = header["key"]
    return {k: v.clone() for k, v in state["weights"][key].items()}, json.loads(json.dumps(state["configs"][key]))


def layer(code, header: dict, t: dict, state: dict):
    """attention(x, weights, *, config, position_ids, attention_mask=None)"""
    w, config = _weights(header, state)
    with torch.no_grad():
        return code(t["x"], w, config=config, position_ids=t["position_ids"], attention_mask=t.get("attention_mask"))


def module(build, header: dict, t: dict, state: dict):
    """build(config, weights) once per weights key, then layer(x, position_ids, attention_mask=None)."""
    key = header["key"]
    if key not in state["modules"]:
        w, config = _weights(header, state)
        state["modules"][key] = build(config, w)
    with torch.no_grad():
        return state["modules"][key](t["x"], t["position_ids"], attention_mask=t.get("attention_mask"))


def features(header: dict, t: dict) -> dict:
    """The kernel's optional keywords this call carries, and only those: window (a pair), softcap, sinks. A kernel
    whose signature lacks one is never called with it (the judge skips those scenarios)."""
    kw = {}
    if header.get("window") is not None:
        kw["window"] = tuple(header["window"])
    if header.get("softcap"):
        kw["softcap"] = header["softcap"]
    if t.get("sinks") is not None:
        kw["sinks"] = t["sinks"]
    return kw


def core(code, header: dict, t: dict, state: dict):
    """attn(q, k, v, *, causal=True, scale=None, attention_mask=None[, window=..., softcap=..., sinks=...])"""
    with torch.no_grad():
        return code(t["q"], t["k"], t["v"], causal=header["causal"], scale=header["scale"],
                    attention_mask=t.get("attention_mask"), **features(header, t))  # fmt: skip


def layer_gradients(code, kind: str, config: dict, w: dict, x, pos, mask, g, wrt=GRAD_OF[1:]) -> list:
    """Gradients of sum(out * g) w.r.t. x and the weights named in wrt (default the four projections; None where
    nothing flows back), for a layer or a module (built here, from weights that require grad, so a module that uses
    them directly gives their gradients). Also run on the catalog's bugs, as suspects."""
    x = x.detach().clone().requires_grad_(True)
    w = {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}
    with torch.enable_grad():
        if kind == "module":
            out = code(config, w)(x, pos, attention_mask=mask)
        else:
            out = code(x, w, config=config, position_ids=pos, attention_mask=mask)
        if not isinstance(out, torch.Tensor) or out.shape != g.shape:
            return [out]  # described and refused by the caller, like a forward output
        wanted = [x] + [w[n] for n in wrt]
        return list(torch.autograd.grad((out * g.to(out.dtype)).sum(), wanted, allow_unused=True))


def layer_grad(code, header: dict, t: dict, state: dict):
    """header["wrt"]: the weights whose gradients are wanted (e2e --train: the family's q_norm, k_norm, biases and
    sinks too, each a parameter of the model); absent: the four projections."""
    config = json.loads(json.dumps(state["configs"][header["key"]]))
    return tuple(layer_gradients(code, header["kind"], config, state["weights"][header["key"]], t["x"],
                                 t["position_ids"], t.get("attention_mask"), t["g"],
                                 tuple(header.get("wrt") or GRAD_OF[1:])))  # fmt: skip


def core_gradients(code, q, k, v, causal, scale, mask, g, **kw) -> list:
    """Gradients of sum(out * g) w.r.t. q, k, v and, when kw has sinks, the sinks; also run on the catalog's bugs.
    kw: the optional keywords that are set (features())."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    wrt = [q, k, v]
    if kw.get("sinks") is not None:
        kw["sinks"] = kw["sinks"].detach().clone().requires_grad_(True)
        wrt.append(kw["sinks"])
    with torch.enable_grad():
        value = code(q, k, v, causal=causal, scale=scale, attention_mask=mask, **kw)
        out = value[0] if isinstance(value, tuple) else value
        if not isinstance(out, torch.Tensor) or out.shape != g.shape:
            return [out]
        return list(torch.autograd.grad((out * g.to(out.dtype)).sum(), wrt, allow_unused=True))


def core_grad(code, header: dict, t: dict, state: dict):
    return tuple(core_gradients(code, t["q"], t["k"], t["v"], header["causal"], header["scale"],
                                t.get("attention_mask"), t["g"], **features(header, t)))  # fmt: skip


def paged(code, header: dict, t: dict, state: dict):
    """attn(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None[, window, softcap, sinks])"""
    with torch.no_grad():
        return code(t["q"], t["k_cache"], t["v_cache"], block_table=t["block_table"],
                    cache_seqlens=t["cache_seqlens"], causal=header["causal"], scale=header["scale"],
                    **features(header, t))  # fmt: skip


def varlen(code, header: dict, t: dict, state: dict):
    """attn(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None[, window,
    softcap, sinks])"""
    with torch.no_grad():
        return code(t["q"], t["k"], t["v"], cu_seqlens_q=t["cu_seqlens_q"], cu_seqlens_k=t["cu_seqlens_k"],
                    max_seqlen_q=header["max_seqlen_q"], max_seqlen_k=header["max_seqlen_k"],
                    causal=header["causal"], scale=header["scale"], **features(header, t))  # fmt: skip
