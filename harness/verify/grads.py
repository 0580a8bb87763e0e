"""`verify --grad`: the backward pass, against transformers run through autograd.

    the loss        sum(out * g), g a fixed seeded tensor of the output's shape, zero on padding rows (their
                    outputs are never used, so nothing may flow back from them)
    layers/modules  gradients w.r.t. x and the four weights, vs transformers' LlamaAttention (eager, in the
                    scenario's dtype) and its sdpa path in float64 (float64 RoPE tables)
    kernels         gradients w.r.t. q, k and v, vs eager_attention_forward and sdpa_attention_forward in float64
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

from dataclasses import dataclass

import torch

from harness.bugs import catalog
from harness.reference import additive_mask, float64_tables, hf_config
from harness.verify.compare import Comparison, compare
from harness.verify.diagnose import Diagnosis, _rms

GRAD_TOL = 1e-3  # of the gradient's own scale (max |HF gradient|)
LAYER_QUICK = ("short", "left_padding", "sparse_positions", "bfloat16")
LAYER_FULL = LAYER_QUICK + ("one_token", "len_257", "long_2048", "scaled_x50", "zero_positions")
KERNEL_QUICK = ("prefill_17", "chunk_17_of_300", "padding", "noncausal", "bfloat16")
KERNEL_FULL = KERNEL_QUICK + ("mha_113_d32", "mqa_257_d128", "decode_1", "scale_0.3", "scores_x25", "gqa_1000_d96",
                              "float16")  # fmt: skip
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
    """{"x", "q_proj", ...}: transformers' LlamaAttention (eager or sdpa in dtype; sdpa with float64 tables in
    float64)."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    dt = torch.float64 if float64 else dtype
    cfg = hf_config(config, "sdpa" if float64 else path)
    with torch.device("meta"):
        attn = LlamaAttention(cfg, 0).to(dt)
    state = {f"{n}.weight": torch.nn.Parameter(weights[n].to(dt, copy=True)) for n in WEIGHTS}
    attn.load_state_dict(state, assign=True)
    xx = x.to(dt).detach().requires_grad_(True)
    B, S, _ = x.shape
    with torch.enable_grad():
        pe = float64_tables(config, pos) if float64 else LlamaRotaryEmbedding(cfg)(xx, pos)
        out, _ = attn(xx, position_embeddings=pe, attention_mask=additive_mask(S, S, mask, B, dt))
        params = [getattr(attn, n).weight for n in WEIGHTS]
        grads = torch.autograd.grad((out * g.to(dt)).sum(), [xx, *params])
    return dict(zip(("x", *WEIGHTS), grads, strict=True))


def hf_kernel_grads(q, k, v, mask4, g, scale, dtype, float64: bool = False, path: str = "eager") -> dict:
    """{"q", "k", "v"}: eager_attention_forward (or sdpa's) in dtype, sdpa_attention_forward in float64."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    dt = torch.float64 if float64 else dtype
    m = torch.nn.Module()
    m.num_key_value_groups, m.training, m.is_causal = q.shape[1] // k.shape[1], False, False
    qq, kk, vv = (t.to(dt).detach().requires_grad_(True) for t in (q, k, v))
    bias = torch.zeros(mask4.shape, dtype=dt).masked_fill(~mask4, torch.finfo(dt).min)
    fn = sdpa_attention_forward if float64 or path == "sdpa" else eager_attention_forward
    with torch.enable_grad():
        out = fn(m, qq, kk, vv, bias, scaling=scale)[0].transpose(1, 2)  # (B, H, Sq, d)
        grads = torch.autograd.grad((out * g.to(dt)).sum(), [qq, kk, vv])
    return dict(zip(("q", "k", "v"), grads, strict=True))


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
    if t.dim() == 2:  # a weight [out, in]
        return t[None]
    if t.dim() == 4:  # a kernel's (B, H, S, d): one row per (head, position)
        return t.flatten(1, 2)
    return t


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
    zeros = ref == 0  # where transformers' gradient is exactly zero (padded positions and keys)
    if name == "x" and r.keep is not None and bool((~r.keep).any()):
        stray = float(got.double().abs()[zeros & ~keep[..., None]].max()) if (zeros & ~keep[..., None]).any() else 0
        if stray > 0:
            c.passed, c.rule = False, f"exact zeros where transformers' are (padding): {stray:.2e} leaked"
    return c


# ---------------------------------------------------------------------------------------------------------
# diagnosis


def diagnose_grads(runs: dict[str, GradRun], failing: dict[str, list[str]], contract: str, config: dict | None,
                   suspect_grads) -> Diagnosis:  # fmt: skip
    """failing: scenario -> the gradients that fail there. suspect_grads(bug, run) -> that bug's gradients on the
    run's inputs (float64), for the catalog's backward suspects (matched first: a suspect explains NaN too)."""
    fp32 = [n for n in failing if runs[n].dtype == torch.float32]
    best = None
    for bug in catalog.grad_suspects(contract, config):
        worst = 0.0
        for n in fp32:
            try:
                sus = suspect_grads(bug, runs[n])
            except Exception:  # noqa: BLE001
                worst = None
                break
            ratio = _grad_match(runs[n], sus, failing[n])
            if ratio is None:
                worst = None
                break
            worst = max(worst, ratio)
        if fp32 and worst is not None and (best is None or worst < 0.99 * best[1]):
            best = (bug, worst)
    if best is not None:
        return Diagnosis(best[0].stage, best[0].hint, best[0].name)
    bad = {n for n, names in failing.items() if any(not torch.isfinite(runs[n].got[k]).all() for k in names)}
    if bad:
        return Diagnosis("grad_nonfinite", f"NaN/Inf in the gradients ({', '.join(sorted(bad))}): rows that see no "
                         "key (lse = -inf) must give P = 0 and zero gradient, not exp(-inf - -inf)", "nonfinite")
    return _pattern(runs, failing, contract, config)


def _grad_match(r: GradRun, sus: dict, names: list[str]) -> float | None:
    """Like the forward's suspects (diagnose._match), on the failing gradients. A suspect's NaN must be the
    implementation's; the implementation may overflow where the float64 suspect does not (compared on the rest)."""
    worst, compared = 0.0, 0
    for k in names:
        a, b = as_rows(r.got[k]), as_rows(sus[k])
        if bool((~torch.isfinite(b) & torch.isfinite(a)).any()):
            return None
        keep = (torch.isfinite(a) & torch.isfinite(b)).all(-1)  # rows that are finite in both
        if not keep.any():
            continue
        compared += 1
        got = _rms(a, b, keep)
        base = _rms(a, as_rows(r.ref[k]), keep)
        noise = _rms(as_rows(r.ref[k]), as_rows(r.ref64[k]), keep)
        if not got <= 0.3 * base + 2 * noise:
            return None
        worst = max(worst, got / max(base, 1e-30))
    return worst if compared else None


def _factor(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(c, residual): the least-squares c with got ~ c ref, and how much is left (relative)."""
    a, b = got.double().flatten(), ref.double().flatten()
    c = float(a @ b / (b @ b).clamp(min=1e-300))
    return c, float((a - c * b).norm() / a.norm().clamp(min=1e-300))


def _pattern(runs, failing, contract, config) -> Diagnosis:
    names = {k for ks in failing.values() for k in ks}
    q, k_, v, o = ("q", "k", "v", None) if contract == "core" else ("q_proj", "k_proj", "v_proj", "o_proj")
    fp32 = [n for n in failing if runs[n].dtype == torch.float32] or list(failing)
    r = runs[fp32[0]]
    # a constant factor on dq and dk (and nothing on dv): the softmax scale in the backward
    if q in names and v not in names:
        cq, rq = _factor(r.got[q], r.ref[q])
        if rq < 1e-3 and abs(cq - 1) > 1e-3:
            return Diagnosis("grad_scale", f"dQ looks multiplied by {cq:.4g} (and dK alike): apply the softmax scale "
                             "once to dQ = scale dS K and dK = scale dS^T Q", "factor")  # fmt: skip
    if contract == "layer" and names <= set(WEIGHTS):
        wrong = ", ".join(sorted(names))
        return Diagnosis("grad_projection", f"the gradient of x is right but not that of {wrong}: a projection's "
                         "weight gradient (grad_W = sum over the batch and positions of grad_y^T x)", "weights")
    padded = {n for n in runs if runs[n].keep is not None and not bool(runs[n].keep.all())}
    padded |= {n for n in runs if n == "padding"}
    if set(failing) <= padded and padded:
        return Diagnosis("grad_mask", "only the padded cases fail: the backward must mask padded keys exactly as the "
                         "forward does (they get zero gradient)", "padding")  # fmt: skip
    if o is not None and o in names:
        return Diagnosis("grad_projection", "o_proj's weight gradient is wrong (it depends only on the context and "
                         "the output gradient): check the output projection's backward", "o_proj")  # fmt: skip
    grouped = config is None or config["num_key_value_heads"] < config["num_attention_heads"]
    if grouped and q not in names and (k_ in names or v in names):
        return Diagnosis("grad_gqa", "dQ is right but dK/dV are not: a KV head's gradient must be the sum over the "
                         "query heads it serves (j*g .. j*g+g-1)", "kv_side")  # fmt: skip
    if "zero_positions" in runs and "zero_positions" not in failing and contract == "layer":
        return Diagnosis("grad_rope", "right with every position 0 (RoPE the identity), wrong otherwise: RoPE's "
                         "backward must rotate the gradient by the inverse rotation (-angle)", "zero_positions")
    if v not in names and (q in names or k_ in names):
        return Diagnosis("grad_softmax", "dV (P^T dO) is right but dQ/dK are not: the softmax backward, dS = P * "
                         "(dP - D) with D = rowsum(dO * O), P recomputed from lse", "dv_right")  # fmt: skip
    if v in names and q in names:
        return Diagnosis("grad_projection", "every gradient into the attention is off, dV included: the gradient "
                         "entering the attention (the output projection's backward) is wrong", "upstream")
    return Diagnosis("grad_unknown", "no single backward stage explains the gradients that fail: "
                     + ", ".join(f"{n}: {'/'.join(ks)}" for n, ks in failing.items()))

