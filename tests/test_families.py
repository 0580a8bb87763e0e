"""Every built-in layer against each family's own transformers attention module: Qwen2, Qwen3, Mistral, Gemma 2,
Gemma 3 (a sliding and a full layer), GPT-OSS (a sliding layer), Phi-3 (partial rotary 0.75, longrope).

Configs come from transformers' own config classes, small (hidden 256, 4 query heads, 2 KV heads, head_dim 64),
keeping each family's attention fields (Qwen2's q/k/v biases; Qwen3's q/k norms; Mistral's window; Gemma 2's
query_pre_attn_scalar 144 != head_dim and softcap 50; Gemma 3's (1 + w) norms and rope per layer type; GPT-OSS's
sinks, q/k/v/o biases and yarn; Phi-3's fused qkv, partial rotary and longrope), with every window (16 keys)
binding at the lengths used (S = 40 > 16). Random weights: biases and norm weights perturbed by N(0, 0.1) around the
family's identity (0 for a bias and for Gemma's stored w, 1 for Qwen3's w) so each one moves the output by about
1000x the tolerance; sinks ~ N(0, 1).

The reference: the family's Attention class, eager, with its own rotary embedding (Gemma 3's per layer type) and
the mask its Model builds for that layer type (masking_utils.create_causal_mask or
create_sliding_window_causal_mask; eager with attention_mask=None would not be causal).

Tolerances, relative to the reference's largest |value|:
- float32: 1e-4. Both sides compute in float32 and differ in summation order only (2-5e-7 measured).
- float64: 1e-10, against the same module in float64 with its two float32 islands widened (`exact64`: eager's
  softmax dtype=torch.float32 and the RMSNorms' float32 upcast) and float64 RoPE tables (transformers' rope init
  functions give float32 only; impl.rope's float32 tables are checked bit-identical to transformers' below, and its
  float64 ones evaluate the same formulas). Measured: 3e-16 to 2e-15, forward and backward.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RMSNorm, Gemma3RotaryEmbedding
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RMSNorm, Qwen3RotaryEmbedding

from impl import CORES, IMPLEMENTATIONS, decode, rope
from impl.decode import KVCache
from impl.layer import keywords
from impl.projection import rms_norm, rope_tables

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
W = 16  # every sliding window here: binds at S = 40
SMALL = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=6, intermediate_size=512,
             vocab_size=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
D64 = dict(head_dim=64)  # Qwen2 and Phi-3 have no head_dim field: hidden_size / num_attention_heads = 64 too
# Phi-4-mini's longrope, scaled down: original context 32, extended 1024 (factor 32, as 4096 -> 131072), one
# factor per rotated pair (rotary_dim = 0.75 * 64 = 48: 24 pairs); S > 32 selects the long factors.
PHI_ROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75,
    "short_factor": [1.0 + 0.02 * i for i in range(24)],
    "long_factor": [1.0 + 0.9 * i for i in range(24)],
    "original_max_position_embeddings": 32,
}
GEMMA3_ROPE = {  # Gemma 3 4B's (and larger): linear factor 8 on base 1e6 for the global layers, base 10000 local
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}

# name: (config class, its fields, Attention, RotaryEmbedding, layer index)
FAMILIES = {
    "qwen2": (Qwen2Config, {}, Qwen2Attention, Qwen2RotaryEmbedding, 0),
    "qwen3": (Qwen3Config, D64, Qwen3Attention, Qwen3RotaryEmbedding, 0),
    "mistral": (MistralConfig, D64 | dict(sliding_window=W), MistralAttention, MistralRotaryEmbedding, 0),
    "gemma2": (Gemma2Config, D64 | dict(query_pre_attn_scalar=144, sliding_window=W, attn_logit_softcapping=50.0),
               Gemma2Attention, Gemma2RotaryEmbedding, 0),
    "gemma3-sliding": (Gemma3TextConfig, D64 | dict(sliding_window=W, rope_parameters=GEMMA3_ROPE), Gemma3Attention,
                       Gemma3RotaryEmbedding, 0),
    "gemma3-full": (Gemma3TextConfig, D64 | dict(sliding_window=W, rope_parameters=GEMMA3_ROPE), Gemma3Attention,
                    Gemma3RotaryEmbedding, 5),
    "gpt_oss": (GptOssConfig, D64 | dict(sliding_window=W, num_local_experts=4, num_experts_per_tok=2),
                GptOssAttention, GptOssRotaryEmbedding, 0),
    "phi3": (Phi3Config, dict(max_position_embeddings=1024, original_max_position_embeddings=32,
                              rope_parameters=PHI_ROPE, sliding_window=None), Phi3Attention, Phi3RotaryEmbedding, 0),
}  # fmt: skip
NAMES = sorted(FAMILIES)
CPU_IMPLS = ["naive", "loop", "tiled", "sdpa"]  # triton: interpreted on a CPU, tested on short lengths below


@dataclass
class Family:
    name: str
    hf: object  # the transformers config
    attn: torch.nn.Module  # the family's Attention, float32, random weights
    rotary: torch.nn.Module
    config: dict  # ours: the config as a dict + layer_idx, layer_type
    weights: dict  # ours, float32

    @property
    def sliding(self) -> bool:
        return self.config["layer_type"] == "sliding_attention"


def _init(attn: torch.nn.Module, name: str, g: torch.Generator) -> None:
    """Random weights: q/k scaled so scores have std ~2 (Gemma 2: ~12, so the cap of 50 bends them); biases and
    norms around their identity +- N(0, 0.1); sinks N(0, 1)."""
    with torch.no_grad():
        for pname, p in attn.named_parameters():
            n = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if pname == "sinks":
                p.copy_(n)
            elif pname.endswith("bias"):
                p.copy_(0.1 * n)
            elif pname.endswith("norm.weight"):  # Gemma stores w (applied as 1 + w), Qwen3 the gain itself
                p.copy_(0.1 * n + (0.0 if isinstance(attn, Gemma3Attention) else 1.0))
            else:
                gain = 1.5 if pname.split(".")[0] in ("q_proj", "k_proj", "qkv_proj") else 1.0
                gain *= 8.0 if name == "gemma2" and pname.startswith("q_proj") else 1.0
                p.copy_(gain * n / p.shape[1] ** 0.5)


def ours(attn: torch.nn.Module, hf, grad: bool = False) -> dict:
    """The family's module's parameters (or their gradients) under the layer contract's names (Phi-3's fused qkv
    split into q, k, v)."""
    w = {}
    for pname, p in attn.named_parameters():
        p = p.grad if grad else p.detach().clone()
        if pname == "qkv_proj.weight":
            q, kv = hf.num_attention_heads * attn.head_dim, hf.num_key_value_heads * attn.head_dim
            w["q_proj"], w["k_proj"], w["v_proj"] = p.split([q, kv, kv])  # rows: q, then k, then v
        else:
            w[pname.removesuffix(".weight")] = p  # q_proj.weight -> q_proj; q_proj.bias, sinks kept; q_norm
    return w


def family(name: str) -> Family:
    Cfg, fields, Attn, Rotary, layer = FAMILIES[name]
    hf = Cfg(**{**SMALL, **fields})
    hf._attn_implementation = "eager"
    attn = Attn(hf, layer).eval()
    _init(attn, name, torch.Generator().manual_seed(sorted(FAMILIES).index(name)))
    types = getattr(hf, "layer_types", None)
    layer_type = types[layer] if types else "sliding_attention" if hf.sliding_window else "full_attention"
    config = hf.to_dict() | {"layer_idx": layer, "layer_type": layer_type}
    return Family(name, hf, attn, Rotary(hf), config, ours(attn, hf))


@pytest.fixture(scope="module")
def families():
    return {name: family(name) for name in NAMES}


def test_the_families_fields_are_there(families):
    """Guards the comparisons below: each family's distinguishing field is set and reaches the kernel."""
    f = families
    qwen2 = set(f["qwen2"].weights)
    assert {"q_proj.bias", "k_proj.bias", "v_proj.bias"} <= qwen2 and "o_proj.bias" not in qwen2
    assert {"q_norm", "k_norm"} <= set(f["qwen3"].weights) and {"q_norm", "k_norm"} <= set(f["gemma3-full"].weights)
    assert {"o_proj.bias", "sinks"} <= set(f["gpt_oss"].weights)
    assert keywords(f["mistral"].config, {}) == {"window": (W - 1, 0)}
    assert keywords(f["gemma2"].config, {}) == {"window": (W - 1, 0), "scale": 144**-0.5, "softcap": 50.0}
    assert keywords(f["gemma3-full"].config, {}) == {"scale": 256**-0.5}  # full layer: no window
    assert keywords(f["gemma3-sliding"].config, {})["window"] == (W - 1, 0)
    assert set(keywords(f["gpt_oss"].config, f["gpt_oss"].weights)) == {"window", "sinks"}
    assert keywords(f["qwen2"].config, f["qwen2"].weights) == keywords(f["phi3"].config, {}) == {}
    assert rope.dims(f["phi3"].config) == (64, 48)


# ----- the reference --------------------------------------------------------------------------------------------


@contextmanager
def exact64(attn: torch.nn.Module):
    """transformers' eager path keeps two float32 islands in a float64 module: the softmax (dtype=torch.float32) and
    the RMSNorm's upcast to float32. Here both stay in float64; everything else is the family's own code."""
    softmax = torch.nn.functional.softmax

    def softmax64(t, dim=None, _stacklevel=3, dtype=None):
        return softmax(t, dim=dim, dtype=t.dtype if t.dtype == torch.float64 else dtype)

    def norm64(norm):  # the family's RMSNorm formula without the casts
        if isinstance(norm, Gemma3RMSNorm):
            return lambda x: norm._norm(x) * (1.0 + norm.weight)
        assert isinstance(norm, Qwen3RMSNorm)
        return lambda x: norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.nn.functional, "softmax", softmax64))
        for name in ("q_norm", "k_norm"):
            if hasattr(attn, name):
                stack.enter_context(mock.patch.object(getattr(attn, name), "forward", norm64(getattr(attn, name))))
        yield


def tables(f: Family, x: torch.Tensor, pos: torch.Tensor):
    """cos, sin as the family's model hands them to its attention: its own rotary embedding in float32; float64
    tables from impl.rope in float64. GPT-OSS's have one angle per pair (rd / 2), the others each angle twice."""
    if x.dtype == torch.float32:
        args = (f.config["layer_type"],) if isinstance(f.rotary, Gemma3RotaryEmbedding) else ()
        return f.rotary(x, pos, *args)
    cos, sin = rope_tables(f.config, pos, dtype=torch.float64)  # (B, S, rd)
    if isinstance(f.attn, GptOssAttention):
        cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]  # (B, S, rd/2)
    return cos, sin


def hf_mask(f: Family, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The 4-D mask the family's Model builds for this layer type (its _attn_implementation: eager)."""
    build = create_sliding_window_causal_mask if f.sliding else create_causal_mask
    m = build(config=f.hf, inputs_embeds=x, attention_mask=mask, past_key_values=None, position_ids=pos)
    assert m is not None and m.shape[-2:] == (x.shape[1], x.shape[1])  # eager: an explicit mask, never None
    return m


def module(f: Family, dtype: torch.dtype) -> torch.nn.Module:
    """The family's module in dtype (a copy: the float32 one stays as it is)."""
    return f.attn if dtype == torch.float32 else copy.deepcopy(f.attn).to(dtype)


def reference(f: Family, x, pos, mask=None, attn=None):
    """The family's Attention on x (its dtype), eager, with its mask and tables."""
    attn = attn or module(f, x.dtype)
    with exact64(attn) if x.dtype == torch.float64 else ExitStack():
        out, _ = attn(x, position_embeddings=tables(f, x, pos), attention_mask=hf_mask(f, x, pos, mask))
    return out


# ----- forward ----------------------------------------------------------------------------------------------------


def inputs(f: Family, B: int, S: int, dtype, seed=0, pad=0):
    """x (B, S, D); positions (B, S); the padding mask (row 1 left-padded by `pad` tokens) or None."""
    x = torch.randn(B, S, f.config["hidden_size"], generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if not pad:
        return x, torch.arange(S)[None].expand(B, S), None
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :pad] = 0
    return x, (mask.cumsum(-1) - 1).clamp(min=0), mask  # positions count real tokens, as generate() does


def check(f: Family, impl: str, x, pos, mask=None, ref=None):
    """impl's output against the reference on the real tokens, relative to the reference's scale."""
    ref = reference(f, x, pos, mask) if ref is None else ref
    w = {k: v.to(x.dtype) for k, v in f.weights.items()}
    with torch.no_grad():
        out = IMPLEMENTATIONS[impl](x, w, config=f.config, position_ids=pos, attention_mask=mask)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    keep = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    err = ((out - ref)[keep].abs().max() / ref[keep].abs().max()).item()
    assert err <= TOL[x.dtype], f"{impl} on {f.name} ({x.dtype}): max |impl - HF| / max |HF| = {err:.2e}"
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", NAMES)
def test_layers_against_the_familys_module(families, name, dtype):
    """S = 40 > the window; batch 2 with 7 tokens of left padding in row 1 (the window then counts padded slots,
    by index, as transformers' mask does)."""
    f = families[name]
    for pad in (0, 7):
        x, pos, mask = inputs(f, 2, 40, dtype, seed=1, pad=pad)
        ref = reference(f, x, pos, mask)
        for impl in CPU_IMPLS:
            check(f, impl, x, pos, mask, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_long_sequence_across_blocks(families, name):
    """S = 700, float32: the window 44x over, tiled's query and key blocks (128 x 512 forward) each skipping the key
    blocks outside their band; positions past Phi-3's original context throughout."""
    f = families[name]
    x, pos, _ = inputs(f, 1, 700, torch.float32, seed=9)
    ref = reference(f, x, pos)
    for impl in CPU_IMPLS:
        check(f, impl, x, pos, ref=ref)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_as_close_as_transformers_own(families, name):
    """bfloat16 weights and inputs: each layer within twice transformers' own bfloat16 distance from its float32
    output (plus 1e-3), on the real tokens. Ours keep RoPE in float32; the norms as the family's."""
    f = families[name]
    x, pos, mask = inputs(f, 2, 40, torch.float32, seed=1, pad=7)
    ref, keep = reference(f, x, pos, mask), mask.bool()
    xb = x.bfloat16()
    args = (f.config["layer_type"],) if isinstance(f.rotary, Gemma3RotaryEmbedding) else ()
    with torch.no_grad():
        own, _ = module(f, torch.bfloat16)(xb, position_embeddings=f.rotary(xb, pos, *args),
                                           attention_mask=hf_mask(f, xb, pos, mask))  # fmt: skip
    bound = 2 * ((own.float() - ref)[keep].abs().max() / ref[keep].abs().max()).item() + 1e-3
    w = {k: v.bfloat16() for k, v in f.weights.items()}
    for impl in CPU_IMPLS:
        with torch.no_grad():
            out = IMPLEMENTATIONS[impl](xb, w, config=f.config, position_ids=pos, attention_mask=mask)
        assert out.dtype == torch.bfloat16
        err = ((out.float() - ref)[keep].abs().max() / ref[keep].abs().max()).item()
        assert err <= bound, f"{impl} on {name} in bfloat16: {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_triton_interpreted(families, name):
    """The triton layer (Triton's interpreter on a CPU: Python speed) on S = 20 > the window, float32."""
    pytest.importorskip("triton")
    f = families[name]
    x, pos, _ = inputs(f, 1, 20, torch.float32, seed=2)
    check(f, "triton", x, pos)


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# A family's field left out (or misread): (family, what changes, (config, weights) -> (config, weights)).
MISTAKES = {
    "qwen2 k bias dropped": ("qwen2", lambda c, w: (c, _without(w, "k_proj.bias"))),
    "qwen3 q_norm dropped": ("qwen3", lambda c, w: (c, _without(w, "q_norm"))),
    "gemma3 (1 + w) read as w": ("gemma3-sliding", lambda c, w: (c | {"model_type": "qwen3"}, w)),
    "gemma3 local layer with the global rope": (
        "gemma3-sliding", lambda c, w: (c | {"rope_parameters": dict.fromkeys(GEMMA3_ROPE, GEMMA3_ROPE[
            "full_attention"])}, w)),
    "gemma3 window on the full layer": ("gemma3-full", lambda c, w: (c | {"layer_type": "sliding_attention"}, w)),
    "gemma2 query_pre_attn_scalar ignored": ("gemma2", lambda c, w: (_without(c, "query_pre_attn_scalar"), w)),
    "gemma2 softcap missing": ("gemma2", lambda c, w: (_without(c, "attn_logit_softcapping"), w)),
    "mistral no window": ("mistral", lambda c, w: (c | {"layer_type": "full_attention"}, w)),
    "gpt_oss sinks dropped": ("gpt_oss", lambda c, w: (c, _without(w, "sinks"))),
    "gpt_oss o bias dropped": ("gpt_oss", lambda c, w: (c, _without(w, "o_proj.bias"))),
    "phi3 every channel rotated (factors 1)": (
        "phi3", lambda c, w: (c | {"rope_parameters": PHI_ROPE | {"partial_rotary_factor": 1.0, "short_factor": [
            1.0] * 32, "long_factor": [1.0] * 32}}, w)),
    "phi3 short factors past the original context": (
        "phi3", lambda c, w: (c | {"rope_parameters": PHI_ROPE | {"long_factor": PHI_ROPE["short_factor"]}}, w)),
}  # fmt: skip


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_field_matters(families, mistake):
    """The comparisons can fail: the layer without one of its family's fields is off by far more than the
    tolerance (so every field above is really exercised by the inputs)."""
    name, mutate = MISTAKES[mistake]
    f = families[name]
    x, pos, _ = inputs(f, 1, 40, torch.float32, seed=3)
    ref = reference(f, x, pos)
    config, w = mutate(f.config, f.weights)
    with torch.no_grad():
        out = IMPLEMENTATIONS["naive"](x, w, config=config, position_ids=pos)
    assert ((out - ref).abs().max() / ref.abs().max()).item() > 100 * TOL[torch.float32]


@pytest.mark.parametrize("start", [0, 100])
def test_phi3_longrope_short_and_long_factors(families, start):
    """S = 12 from position 0: the short factors; from 100 (past the original 32): the long ones."""
    f = families["phi3"]
    x, _, _ = inputs(f, 1, 12, torch.float32, seed=4)
    pos = torch.arange(start, start + 12)[None]
    for impl in ("naive", "tiled"):
        check(f, impl, x, pos)
    check(f, "naive", x.double(), pos)


# ----- backward ---------------------------------------------------------------------------------------------------


def grads_ours(f: Family, impl: str, x, pos, mask, gout):
    w = {k: v.to(x.dtype).requires_grad_() for k, v in f.weights.items()}
    x = x.clone().requires_grad_()
    out = IMPLEMENTATIONS[impl](x, w, config=f.config, position_ids=pos, attention_mask=mask)
    (out * gout).sum().backward()
    return {"x": x.grad} | {k: v.grad for k, v in w.items()}


def grads_hf(f: Family, x, pos, mask, gout):
    attn = module(f, x.dtype)
    x = x.clone().requires_grad_()
    (reference(f, x, pos, mask, attn) * gout).sum().backward()
    return {"x": x.grad} | ours(attn, f.hf, grad=True)


@pytest.mark.parametrize("name", NAMES)
def test_backward_against_the_familys_module(families, name):
    """Gradients of x and of every weight (biases, norms, sinks included) for naive, loop, tiled and sdpa (triton's
    backward: test_triton*.py), float64, left padding, S = 40 > the window; padded rows get no output gradient
    (their outputs are not compared either)."""
    f = families[name]
    x, pos, mask = inputs(f, 2, 40, torch.float64, seed=5, pad=7)
    gout = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=x.dtype) * mask[..., None]
    ref = grads_hf(f, x, pos, mask, gout)
    assert set(ref) == {"x"} | set(f.weights)
    for impl in CPU_IMPLS:
        got = grads_ours(f, impl, x, pos, mask, gout)
        for k, r in ref.items():
            err = ((got[k] - r).abs().max() / r.abs().max()).item()
            assert err <= TOL[torch.float64], f"{impl} on {name}: d{k} off by {err:.2e} (relative)"


# ----- decoding with a KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_the_full_pass(families, name):
    """Prefill 30 tokens, then 10 one at a time (the window sliding over the cache), float64: the full layer.

    Positions 100..139: past Phi-3's original context (32) throughout, so every call picks the long factors. (Across
    that boundary no cache can match a full pass: longrope picks its factors per call from max(position_ids) + 1,
    in transformers as here, and the cached keys keep the short ones.)
    """
    f = families[name]
    x, _, _ = inputs(f, 1, 40, torch.float64, seed=7)
    pos = torch.arange(100, 140)[None]
    w = {k: v.double() for k, v in f.weights.items()}
    full = IMPLEMENTATIONS["naive"](x, w, config=f.config, position_ids=pos)
    cache = KVCache()
    steps = [decode.step(CORES["naive"], x[:, :30], w, config=f.config, position_ids=pos[:, :30], cache=cache)]
    for t in range(30, 40):
        steps.append(decode.step(CORES["naive"], x[:, t : t + 1], w, config=f.config, position_ids=pos[:, t : t + 1],
                                 cache=cache))  # fmt: skip
    err = ((torch.cat(steps, 1) - full).abs().max() / full.abs().max()).item()
    assert err <= TOL[torch.float64], err


# ----- the norms, in every dtype --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["qwen3", "gemma3-full"])
def test_qk_norm_bit_identical_to_the_familys_rmsnorm(families, name, dtype):
    """Qwen3's x / rms back in the dtype then times w, Gemma 3's (1 + w) in float32 then the dtype: the same bits."""
    f = families[name]
    t = torch.randn(2, 4, 40, 64, generator=torch.Generator().manual_seed(8)).to(dtype) * 3  # (B, H, S, d)
    norm = copy.deepcopy(f.attn.q_norm).to(dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm(t, f.weights["q_norm"].to(dtype), f.config), norm(t))


# ----- RoPE: per layer type, longrope -----------------------------------------------------------------------------


def test_layer_rope_picks_the_layers_parameters(families):
    cfg = families["gemma3-full"].config
    assert rope.layer_rope(cfg)["rope_parameters"] == GEMMA3_ROPE["full_attention"]
    assert rope.layer_rope(cfg | {"layer_type": "sliding_attention"})["rope_parameters"]["rope_theta"] == 1e4
    flat = families["qwen3"].config
    assert rope.layer_rope(flat) is flat and rope.layer_rope(rope.layer_rope(cfg)) == rope.layer_rope(cfg)
    with pytest.raises(ValueError, match="keyed by layer type"):
        rope.layer_rope({k: v for k, v in cfg.items() if k != "layer_type"})


@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
def test_gemma3_frequencies_bit_identical_per_layer_type(families, layer_type):
    f = families["gemma3-full"]
    ours_, scaling = rope.inv_freq(f.config | {"layer_type": layer_type})
    assert torch.equal(ours_, getattr(f.rotary, f"{layer_type}_inv_freq"))
    assert scaling == getattr(f.rotary, f"{layer_type}_attention_scaling")
    pos = torch.tensor([[0, 1, 511, 512, 513, 4000, 100000]])
    cos, sin = rope_tables(f.config | {"layer_type": layer_type}, pos)
    hcos, hsin = f.rotary(torch.zeros(1), pos, layer_type)
    assert torch.equal(cos, hcos) and torch.equal(sin, hsin)


@pytest.mark.parametrize("seq_len", [None, 32, 33, 1000])
def test_longrope_bit_identical_to_transformers(families, seq_len):
    """Short factors up to the original context (32), long ones past it; the attention factor
    sqrt(1 + ln 32 / ln 32) = sqrt(2)."""
    f = families["phi3"]
    ours_, scaling = rope.inv_freq(f.config, seq_len=seq_len)
    theirs, their_scaling = ROPE_INIT_FUNCTIONS["longrope"](f.hf, None, seq_len)
    assert ours_.shape == (24,) and torch.equal(ours_, theirs) and scaling == their_scaling == 2**0.5
    f64, _ = rope.inv_freq(f.config, seq_len=seq_len, dtype=torch.float64)
    torch.testing.assert_close(f64, theirs.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("start", [0, 100])
def test_phi3_tables_bit_identical(families, start):
    f = families["phi3"]
    pos = torch.arange(start, start + 12)[None]
    cos, sin = rope_tables(f.config, pos)
    hcos, hsin = f.rotary(torch.zeros(1), pos)
    assert cos.shape[-1] == 48 and torch.equal(cos, hcos) and torch.equal(sin, hsin)
