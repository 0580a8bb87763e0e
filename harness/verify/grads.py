"""`verify --grad`: the backward pass, against transformers run through autograd.

    the loss        sum(out * g), g a fixed seeded tensor of the output's shape, zero on padding rows (their
                    outputs are never used, so nothing may flow back from them)
    layers/modules  gradients w.r.t. x and the four weights, vs the family's transformers attention module
                    (reference/: eager, in the scenario's dtype; float64 with float64 RoPE tables)
    kernels         gradients w.r.t. q, k and v (and the sinks, when given), vs transformers' functions of the kernel
                    matrix (kernel_hf.py: llama's, gemma2's, gpt_oss's eager functions; sdpa's) in the dtype and in
                    float64
    the rule        the forward policy, scale-aware: in float32, max |impl - HF| <= 1e-3 x max |HF gradient| (an
                    output of order 1 gets 1e-3; a gradient's scale is its own), or closer to float64 than twice
                    HF's own distance plus the rounding floor; bfloat16/float16: the FlashAttention rule against
                    float64. Padded rows and keys: exactly zero gradient wherever transformers' is exactly zero.
    scenarios       short, a block-edge length, long (2048), left padding, sparse positions (RoPE's backward is
                    the inverse rotation), scores in the thousands, bfloat16; GQA by the fixtures' head ratios
    diagnosis       grad_nonfinite; the catalog's backward bugs as suspects (re-run in float64); then which
                    gradients are wrong: a constant factor on dq/dk (grad_scale), only padding (grad_mask), only
                    the K/V side of a shared head (grad_gqa), right with RoPE off (grad_rope), o_proj's or the
                    value path's (grad_projection), dq/dk with dv right (grad_softmax), else grad_unknown
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.reference import Reference, Reference64
from harness.verify import kernel_hf
from harness.verify.compare import PRECISION_LIMIT, Comparison, compare

GRAD_TOL = 1e-3  # of the gradient's own scale (max |HF gradient|)
FA_ULPS = 16.0  # the precision ratio's floor, in ulps of the gradient's scale: sqrt(256), the largest head_dim here
LAYER_QUICK = ("short", "left_padding", "sparse_positions", "bfloat16")
LAYER_FULL = LAYER_QUICK + ("one_token", "len_257", "long_2048", "scaled_x50", "zero_positions")
KERNEL_QUICK = ("prefill_17", "chunk_17_of_300", "padding", "noncausal", "bfloat16", "window_chunk", "all_three")
KERNEL_FULL = KERNEL_QUICK + ("mha_113_d32", "mqa_257_d128", "decode_1", "scale_0.3", "scores_x25", "gqa_1000_d96",
                              "float16", "window_64_len65", "window_padding", "window_bidir", "softcap_30_x50",
                              "softcap_bf16", "sinks_large", "sinks_negative", "sinks_padding", "all_three_decode",
                              "all_three_bf16")  # fmt: skip
WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def seeded_g(shape, keep: torch.Tensor | None, dtype) -> torch.Tensor:
    """The loss's fixed direction: N(0, 1), zero on rows that are not compared (padding, rows that see no key)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1234))
    if keep is not None:
        g = g * keep.reshape(*keep.shape, *([1] * (len(shape) - keep.dim()))).to(g.dtype)
    return g.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# references: transformers through autograd


def hf_layer_grads(config: dict, weights: dict, x, pos, mask, g, dtype, float64: bool = False,
                   path: str = "eager") -> dict:  # fmt: skip
    """{"x", "q_proj", ...}: the family's transformers attention module (Reference: eager or sdpa in dtype;
    Reference64 in float64), its parameters' gradients under the contract's names (Phi-3's qkv_proj split back)."""
    dt = torch.float64 if float64 else dtype
    ref = Reference64(config, weights) if float64 else Reference(config, weights, dtype=dt, attn_implementation=path)
    params = dict(ref.attn.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    xx = x.to(dt).detach().requires_grad_(True)
    with torch.enable_grad():
        out = ref.forward(xx, pos, mask)
        grads = torch.autograd.grad((out * g.to(dt)).sum(), [xx, *params.values()], allow_unused=True)
    got = dict(zip(params, grads[1:], strict=True))
    if "qkv_proj.weight" in got:  # Phi-3: rows q, then k, then v
        sizes = [weights[n].shape[0] for n in ("q_proj", "k_proj", "v_proj")]
        got |= dict(zip(("q_proj.weight", "k_proj.weight", "v_proj.weight"), got["qkv_proj.weight"].split(sizes),
                        strict=True))  # fmt: skip
    return {"x": grads[0]} | {n: got[f"{n}.weight"] for n in WEIGHTS}


def hf_kernel_grads(q, k, v, mask4, g, scale, dtype, float64: bool = False, path: str = "eager",
                    softcap: float = 0.0, sinks: torch.Tensor | None = None) -> dict:  # fmt: skip
    """{"q", "k", "v"} (and "sinks" when given): transformers' function for the case (kernel_hf.forward) in dtype
    (path eager, or sdpa's where it has one), in float64 with float64 sinks."""
    dt = torch.float64 if float64 else dtype
    qq, kk, vv = (t.to(dt).detach().requires_grad_(True) for t in (q, k, v))
    wrt = [qq, kk, vv]
    ss = None
    if sinks is not None:  # float32 as the kernel gets them; float64 on the float64 path
        ss = sinks.to(torch.float64 if float64 else torch.float32).detach().requires_grad_(True)
        wrt.append(ss)
    with torch.enable_grad():
        out = kernel_hf.forward(qq, kk, vv, mask4, scale, softcap, ss, path="float64" if float64 else path)
        grads = torch.autograd.grad((out * g.to(dt)).sum(), wrt)  # out (B, H, Sq, d)
    return dict(zip(("q", "k", "v", "sinks"), grads, strict=False))  # sinks: only when given


# ---------------------------------------------------------------------------------------------------------
# comparison


@dataclass
class GradRun:
    """One scenario's gradients: the implementation's, transformers' in the dtype and in float64."""

    got: dict
    ref: dict  # transformers' eager path
    ref64: dict
    dtype: torch.dtype
    ref_sdpa: dict | None = None  # transformers' sdpa path: its two paths' spread is float32's own conditioning
    keep: torch.Tensor | None = None  # (B, S) rows of x compared; None for weights and kernels' full tensors
    inputs: tuple = ()  # what to re-run a suspect on


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """Any gradient -> (1 or B, rows, columns), the layout compare() reads."""
    if t.dim() == 1:  # the sinks' [H]: one row
        return t[None, None]
    if t.dim() == 2:  # a weight [out, in]
        return t[None]
    if t.dim() == 4:  # a kernel's (B, H, S, d): one row per (head, position)
        return t.flatten(1, 2)
    return t


def _fa_floor(c: Comparison, fa: float) -> None:
    """The precision ratio with FlashAttention's own rounding in its floor: its backward takes D = rowsum(dO * O)
    where autograd takes sum(P * dP), two float32 dot products over head_dim that differ by ~sqrt(head_dim) ulps of
    |dO| |v|; where transformers' dS is exactly 0 (a softmax over one key, a saturated row) that difference is all
    of an FA-style dq, and transformers' own error says nothing about it."""
    if c.precision_ratio > 0 and c.precision_ratio == c.precision_ratio:  # 0: exact; NaN: not measured
        base = c.err_vs_ref64 / c.precision_ratio if math.isfinite(c.precision_ratio) else 0.0  # HF's + floor
        c.precision_ratio = c.err_vs_ref64 / (base + fa)
        c.imprecise = c.passed and c.precision_ratio > PRECISION_LIMIT


def compare_grad(name: str, r: GradRun) -> Comparison:
    got, ref, ref64 = (as_rows(d[name]) for d in (r.got, r.ref, r.ref64))
    keep = r.keep if (name == "x" and r.keep is not None) else torch.ones(got.shape[:2], dtype=torch.bool)
    scale = float(ref.double().abs().max())
    if scale == 0:  # identically zero here (one key: the softmax's derivative vanishes): the run's own scale
        scale = max(float(t.double().abs().max()) for t in r.ref.values())
    # transformers' own error: the worse of its eager and sdpa paths (with scores in the thousands the softmax's
    # gradient is ill-conditioned, and two correct float32 orders of operations differ by far more than 1e-7)
    spread = None if r.ref_sdpa is None else float((as_rows(r.ref_sdpa[name]).double() - ref64).abs().max())
    c = compare(got, ref, ref64, keep, r.dtype, abs_tol=GRAD_TOL * max(scale, 1e-12), hf_err=spread)
    if not bool(ref.any()) and not bool(ref64.any()):  # exactly zero in both (one key per row): any rounding is
        c.precision_ratio, c.imprecise = float("nan"), False  # infinitely "less precise"; the gate is the check
    else:
        _fa_floor(c, FA_ULPS * torch.finfo(r.dtype).eps * scale)
    zeros = ref == 0  # where transformers' gradient is exactly zero (padded positions and keys)
    if name == "x" and r.keep is not None and bool((~r.keep).any()):
        stray = float(got.double().abs()[zeros & ~keep[..., None]].max()) if (zeros & ~keep[..., None]).any() else 0
        if stray > 0:
            c.passed, c.rule = False, f"exact zeros where transformers' are (padding): {stray:.2e} leaked"
    return c
