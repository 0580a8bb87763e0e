"""Diagnosis: name the first broken stage of a failing implementation, with a hint in the user's terms.

Works on black boxes (only the output is seen):
1. non-finite outputs -> `nonfinite`;
2. suspects: the reference run under a known mistake (scale missing, no causal mask, interleaved RoPE, llama3
   scaling missing, repeat instead of repeat_interleave, ...). If the implementation's output matches one
   suspect on every failing float32 scenario (much closer to it than to the correct reference), that mistake
   is named;
3. otherwise which rows are wrong: whole rows of exact zeros after a sequence's first token mean skipped blocks
   (tiling); only the last token, only where positions are not 0..S-1, means a decode path's position (rope);
4. otherwise the pattern of failing scenarios and probes: one token failing means projections / head layout /
   GQA / o_proj; every sequence above some length failing and every shorter one passing means tiling; passing
   with all positions 0 but failing otherwise means RoPE; only the sparse long-distance positions failing means
   RoPE frequencies; only padding, only the x50 inputs, only half precision point at the padding mask, softmax
   stability, low-precision softmax.
For built-ins that return their intermediates (naive), a stage-by-stage comparison with HF's comes first.

Stages: projection, head_layout, gqa, rope, rope_frequencies, scale, causal_mask, padding_mask, softmax, tiling,
output_projection, nonfinite, unknown.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from harness.reference import additive_mask, float64_tables

STAGES = (
    "projection",
    "head_layout",
    "gqa",
    "rope",
    "rope_frequencies",
    "scale",
    "causal_mask",
    "padding_mask",
    "softmax",
    "tiling",
    "output_projection",
    "nonfinite",
    "unknown",
)


@dataclass(frozen=True)
class Mistake:
    name: str
    stage: str
    hint: str  # may use {sqrt_d}, {d}, {D}, {factor}
    knobs: dict = field(default_factory=dict)


MISTAKES = [
    Mistake(
        "scale_missing",
        "scale",
        "scores look scaled by {sqrt_d:.1f}x: is the 1/sqrt(head_dim) scale missing?",
        {"scale": "none"},
    ),
    Mistake(
        "scale_hidden",
        "scale",
        "scores look scaled by 1/sqrt(hidden_size)={inv_sqrt_D:.4f} instead of "
        "1/sqrt(head_dim)={inv_sqrt_d:.4f}: scale by head_dim, not hidden_size",
        {"scale": "hidden"},
    ),
    Mistake(
        "scale_after_softmax",
        "scale",
        "the 1/sqrt(head_dim) scale looks applied after the softmax: scale the scores before it",
        {"scale": "after_softmax"},
    ),
    Mistake(
        "no_causal_mask", "causal_mask", "tokens attend to later tokens: the causal mask is missing", {"causal": "none"}
    ),
    Mistake(
        "causal_excludes_diagonal",
        "causal_mask",
        "the causal mask hides each token from itself (triu(0) instead of triu(1)): the diagonal must be visible",
        {"causal": "strict"},
    ),
    Mistake(
        "causal_sees_next",
        "causal_mask",
        "the causal mask lets each token see the next one (off by one: triu(2) instead of triu(1))",
        {"causal": "plus1"},
    ),
    Mistake(
        "padding_ignored",
        "padding_mask",
        "padded keys are attended to: apply attention_mask (1 = token, 0 = padding) to the keys",
        {"padding": "ignored"},
    ),
    Mistake(
        "padding_inverted",
        "padding_mask",
        "the padding mask is inverted: 1 means token, 0 means padding (the tokenizer's convention)",
        {"padding": "inverted"},
    ),
    Mistake(
        "softmax_wrong_dim",
        "softmax",
        "probabilities are normalised over the wrong axis: softmax over the keys (dim=-1), not the queries",
        {"softmax": "queries"},
    ),
    Mistake(
        "gqa_tiled",
        "gqa",
        "query head h uses KV head h % Hkv: K/V repeated with `repeat` (tiling) instead "
        "of `repeat_interleave` (KV head j serves query heads j*g..j*g+g-1)",
        {"gqa": "tile"},
    ),
    Mistake(
        "head_split_no_transpose",
        "head_layout",
        "heads look split without the transpose: view(B, S, H, d).transpose(1, 2), not view(B, H, S, d)",
        {"split": "no_transpose"},
    ),
    Mistake(
        "rope_interleaved",
        "rope",
        "RoPE pairs look interleaved (2i, 2i+1) on HF-ordered weights: HF "
        "checkpoints pair channel i with i + d/2 (rotate_half)",
        {"rope": "interleaved"},
    ),
    Mistake("rope_sign", "rope", "RoPE rotates the wrong way: rotate_half must be cat(-x2, x1)", {"rope": "sign"}),
    Mistake("rope_q_only", "rope", "only q looks rotated: apply RoPE to k as well", {"rope": "q_only"}),
    Mistake("rope_on_v", "rope", "v looks rotated too: RoPE applies to q and k only", {"rope": "v_too"}),
    Mistake("rope_none", "rope", "no rotary embedding is applied at all", {"rope": "none"}),
    Mistake(
        "positions_ignored",
        "rope",
        "position_ids look ignored (arange used instead): rotate by the given positions (offset, restarting, sparse)",
        {"positions": "arange"},
    ),
    Mistake(
        "llama3_missing",
        "rope_frequencies",
        "frequencies look unscaled: the llama3 RoPE scaling (factor {factor:g}) is missing",
        {"freq": "no_llama3"},
    ),
    Mistake(
        "llama3_factor8",
        "rope_frequencies",
        "frequencies look scaled with factor 8 instead of {factor:g}: "
        "Meta's reference code hard-codes 8; take rope_parameters from the config",
        {"freq": "factor8"},
    ),
    Mistake(
        "angles_bf16",
        "rope_frequencies",
        "RoPE angles look computed in bfloat16: compute position * inv_freq in float32",
        {"freq": "bf16_angles"},
    ),
    Mistake(
        "o_proj_transposed",
        "output_projection",
        "the output projection looks transposed: use context @ o_proj.T (nn.Linear layout [out, in])",
        {"o_proj": "transposed"},
    ),
]


def _rot_half(x, sign=1.0):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-sign * x2, sign * x1), dim=-1)


def _rope(x, cos, sin, mode):
    c, s = cos[:, None], sin[:, None]  # (B, 1, S, d)
    if mode == "interleaved":
        h = c.shape[-1] // 2
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c[..., :h] - b * s[..., :h], a * s[..., :h] + b * c[..., :h]), -1).flatten(-2)
    return x * c + _rot_half(x, -1.0 if mode == "sign" else 1.0) * s


def suspect(config, weights, x, pos, mask, knobs: dict) -> torch.Tensor:
    """float64 attention with one known mistake switched on (knobs); knobs={} is the correct computation."""
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or config["hidden_size"] // H
    g, D = H // Hkv, config["hidden_size"]
    x = x.double()
    w = {n: t.double() for n, t in weights.items()}
    B, S, _ = x.shape

    def split(t, n):
        if knobs.get("split") == "no_transpose":
            return t.reshape(B, n, S, d)
        return t.view(B, S, n, d).transpose(1, 2)  # (B, n, S, d)

    q, k, v = split(x @ w["q_proj"].T, H), split(x @ w["k_proj"].T, Hkv), split(x @ w["v_proj"].T, Hkv)
    p = torch.arange(S).expand(B, S) if knobs.get("positions") == "arange" else pos
    cfg = dict(config)
    rp = dict(config["rope_parameters"])
    if knobs.get("freq") == "no_llama3":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rp["rope_theta"]}
    elif knobs.get("freq") == "factor8":
        cfg["rope_parameters"] = rp | {"factor": 8.0}
    cos, sin = float64_tables(cfg, p)
    if knobs.get("freq") == "bf16_angles":
        from impl.rope import inv_freq

        inv, _ = inv_freq(config)
        ang = (p.bfloat16()[..., None] * inv.bfloat16()).double()
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    mode = knobs.get("rope", "half")
    if mode != "none":
        q = _rope(q, cos, sin, mode)
        if mode != "q_only":
            k = _rope(k, cos, sin, mode)
        if mode == "v_too":
            v = _rope(v, cos, sin, "half")
    if knobs.get("gqa") == "tile":
        k, v = k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1)
    else:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, H, S, d)
    scale = {"none": 1.0, "hidden": D**-0.5, "after_softmax": 1.0}.get(knobs.get("scale"), d**-0.5)
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, S, S)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    causal = {"none": torch.ones(S, S, dtype=torch.bool), "strict": j < i, "plus1": j <= i + 1}.get(
        knobs.get("causal"), j <= i
    )
    allowed = causal[None, None].expand(B, 1, S, S)
    if mask is not None and knobs.get("padding") != "ignored":
        keys = mask.bool() if knobs.get("padding") != "inverted" else ~mask.bool()
        allowed = allowed & keys[:, None, None, :]
    s = scores.masked_fill(~allowed, float("-inf"))
    dim = -2 if knobs.get("softmax") == "queries" else -1
    m = s.amax(dim, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    probs = e / e.sum(dim, keepdim=True).clamp(min=1e-300)
    if knobs.get("scale") == "after_softmax":
        probs = probs * d**-0.5
    ctx = (probs @ v).transpose(1, 2).reshape(B, S, H * d)  # (B, S, H*d)
    wo = w["o_proj"].T if knobs.get("o_proj") == "transposed" else w["o_proj"]
    return ctx @ wo.T


def applicable(m: Mistake, config: dict) -> bool:
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    rp = config["rope_parameters"]
    if m.knobs.get("gqa") and (H == Hkv or Hkv == 1):
        return False  # the mapping only matters with 1 < Hkv < H
    if m.knobs.get("freq") in ("no_llama3", "factor8") and rp.get("rope_type") != "llama3":
        return False
    if m.knobs.get("o_proj") and config["hidden_size"] != H * (config.get("head_dim") or 0):
        return False
    return True


@dataclass
class Verdict:
    stage: str | None
    hint: str | None
    matched: str | None = None  # the mistake (suspect) or probe that explains it


def _hint(m: Mistake, config: dict) -> str:
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    D = config["hidden_size"]
    return m.hint.format(
        sqrt_d=math.sqrt(d),
        d=d,
        D=D,
        inv_sqrt_D=D**-0.5,
        inv_sqrt_d=d**-0.5,
        factor=config["rope_parameters"].get("factor", 1.0),
    )


def diagnose(fixture, fn, failing: list, passing: list, runs: dict) -> Verdict:
    """failing/passing: scenario names; runs[name] = (x, pos, mask, out, ref, dtype)."""
    config, weights = fixture.config, {k: v.float() for k, v in fixture.weights.items()}
    bad = [runs[n] for n in failing]
    if any(int((~torch.isfinite(r[3])).sum()) for r in bad):
        rows = [n for n in failing if not torch.isfinite(runs[n][3]).all()]
        pad = "left_padding" in rows
        hint = "NaN/Inf in the output" + (
            " of rows whose every key is masked (padding): a fully masked row "
            "must give zeros, not a softmax over all -inf"
            if pad
            else f" (scenarios: {', '.join(rows)})"
        )
        return Verdict("nonfinite", hint)

    stagewise = _stagewise(fixture, fn, runs)
    if stagewise is not None:
        return stagewise

    fp32 = [n for n in failing if runs[n][5] == torch.float32 and runs[n][0].shape[1] <= 257]
    if fp32:
        best = None
        for m in MISTAKES:
            if not applicable(m, config):
                continue
            ok, worst = True, 0.0
            for n in fp32:
                x, pos, mask, out, ref, _ = runs[n]
                keep = mask.bool() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
                got = (out.double() - suspect(config, weights, x, pos, mask, m.knobs))[keep].abs().max().item()
                base = (out.double() - ref.double())[keep].abs().max().item()
                if not (got <= max(1e-3, 0.05 * base)):
                    ok = False
                    break
                worst = max(worst, got / max(base, 1e-12))
            if ok and (best is None or worst < best[1]):
                best = (m, worst)
        if best is not None:
            return Verdict(best[0].stage, _hint(best[0], config), best[0].name)
    return _row_pattern(failing, runs) or _pattern(failing, passing, runs)


POSITION_SCENARIOS = {"left_padding", "packed", "sparse_positions", "zero_positions"}  # positions not 0..S-1


def _row_pattern(failing, runs) -> Verdict | None:
    """Which output rows are wrong: rows of exact zeros where tokens are (skipped blocks), or only the last token
    of each sequence (a decode path), seen on every failing scenario."""
    zero_rows, last_only = False, bool(failing)
    for n in failing:
        x, pos, mask, out, ref, _ = runs[n]
        keep = mask.bool() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)  # (B, S)
        first = keep.float().argmax(-1, keepdim=True)  # (B, 1) the first real token of each row
        after_first = keep & (torch.arange(x.shape[1])[None] > first)  # (B, S)
        zero = (out.float().abs().amax(-1) == 0) & (ref.float().abs().amax(-1) > 0)  # (B, S)
        zero_rows |= bool((zero & after_first).any())  # a first token that sees nothing can be 0; later ones not
        err = (out.double() - ref.double()).abs().amax(-1).masked_fill(~keep, 0)  # (B, S)
        last_only &= x.shape[1] > 1 and bool(err[:, -1].max() > 0) and bool(err[:, :-1].max() <= 1e-2 * err.max())
    if zero_rows:
        return Verdict(
            "tiling",
            "whole output rows are exactly zero where tokens are: query or key blocks were skipped (the last "
            "partial block dropped? loop over ceil(S / block) blocks, not S // block)",
            "zero_rows",
        )
    if last_only and set(failing) <= POSITION_SCENARIOS:
        return Verdict(
            "rope",
            "only the last token is wrong, and only where positions are not 0..S-1: a decode (KV-cache) path "
            "places the new token at the cache length; rotate it by its position_ids",
            "last_token",
        )
    return None


def _pattern(failing, passing, runs) -> Verdict:
    f = set(failing)
    p = set(passing)
    if "one_token" in f:
        return Verdict(
            "projection",
            "even a single token (which attends only to itself) is wrong: check the "
            "q/k/v/o projections, the head split and merge, and the KV-head mapping",
            "one_token",
        )
    if f <= {"sparse_positions", "packed"}:
        return Verdict(
            "rope_frequencies",
            "only unequal long distances between positions fail: the rotary "
            "frequencies are off (rope_theta, llama3 scaling, float32 angles)",
            "sparse_positions",
        )
    fl = {n: runs[n][0].shape[1] for n in f if runs[n][5] == torch.float32}  # failing float32 lengths
    pl = {n: runs[n][0].shape[1] for n in p if runs[n][5] == torch.float32}
    if fl and pl and min(fl.values()) > max(pl.values()):
        shortest = min(fl.values())
        return Verdict(
            "tiling",
            f"every float32 sequence of {shortest} tokens or more fails and every shorter one passes: a block-size "
            "effect (the accumulator rescaling across key blocks, the last partial block, the diagonal blocks' mask)",
            "length",
        )
    if {"zero_positions"} <= p and (f & {"short", "prompt", "sparse_positions", "packed"}):
        return Verdict(
            "rope",
            "correct with every position 0 (RoPE off) but wrong otherwise: the rotary embedding is applied wrongly",
            "zero_positions",
        )
    if f == {"left_padding"}:
        return Verdict(
            "padding_mask",
            "only the padded batch fails: check how attention_mask (1 = token, 0 = padding) masks the keys",
            "left_padding",
        )
    if f <= {"len_257", "len_1000", "long_2048"} and "short" in p:
        return Verdict(
            "tiling",
            "short sequences pass but lengths off the block grid fail: check the last "
            "partial block and the masking of diagonal blocks",
            "len_257",
        )
    if f == {"scaled_x50"}:
        return Verdict(
            "softmax",
            "only inputs scaled x50 fail: the softmax is not stable (subtract the running "
            "max; rescale the accumulator when the max changes)",
            "scaled_x50",
        )
    if f <= {"bfloat16", "float16"}:
        return Verdict("softmax", "only half precision fails: do the softmax and the accumulation in float32", "half")
    return Verdict("unknown", "no single stage explains the failures: " + ", ".join(sorted(f)))


def _stagewise(fixture, fn, runs) -> Verdict | None:
    """Built-ins that can return intermediates: compare them with HF's, stage by stage, on `short`."""
    try:
        if "return_intermediates" not in inspect.signature(fn).parameters or "short" not in runs:
            return None
    except (TypeError, ValueError):
        return None
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from harness.reference import Reference

    x, pos, mask, *_ = runs["short"]
    config, w = fixture.config, {k: v.float() for k, v in fixture.weights.items()}
    _, st = fn(x, w, config=config, position_ids=pos, attention_mask=mask, return_intermediates=True)
    ref = Reference(config, w)
    a = ref.attn
    B, S, _ = x.shape
    shp = (B, S, -1, a.head_dim)
    with torch.no_grad():
        q, k, v = (getattr(a, n)(x).view(shp).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        cos, sin = ref.rope(x, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kk = k.repeat_interleave(a.num_key_value_groups, 1)
        scores = q @ kk.transpose(-2, -1) * a.scaling
        probs = torch.softmax(scores + additive_mask(S, S, mask, B), -1)
        ctx = probs @ v.repeat_interleave(a.num_key_value_groups, 1)
    checks = [
        ("v", v, "projection"),
        ("q", q, "rope"),
        ("k", k, "rope"),
        ("scores", scores, "scale"),
        ("probs", probs, "softmax"),
        ("context", ctx, "gqa"),
    ]
    for name, want, stage in checks:
        got = st.get(name)
        if got is None or got.shape != want.shape or (got.float() - want).abs().max() > 1e-4:
            return Verdict(
                stage,
                f"stage-by-stage: '{name}' is the first intermediate that differs from transformers'",
                f"intermediate:{name}",
            )
    return Verdict(
        "output_projection",
        "every intermediate matches transformers' up to the context: the head merge or o_proj is wrong",
        "intermediate:output",
    )
