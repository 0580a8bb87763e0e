"""The diagnosis of a layer (or module): name the first broken stage of a failing implementation, with a hint in
the user's terms. It works on black boxes: it sees the outputs on the scenarios, and may call the implementation
again on inputs and weights of its own (probes). In order:

1. non-finite outputs: `nonfinite` (rows that see no key give NaN), or `softmax` when only huge scores overflow;
2. stage by stage, for implementations that return their intermediates (naive): the first that differs from HF;
3. the error's signature (signature.py): which step, rounded to float16 or bfloat16, leaves the error the output
   shows (a precision stage, or the projections); first, as it is cheap where no rounding explains the error and
   the suspects are not;
4. suspects re-run in float64 (suspects.py): the catalog's bugs, the fixture's rope parameters changed, a fitted
   constant on the scores;
5. probes that ask the implementation directly (probes.py): causality, padding, the head mapping;
6. a rotary base fitted per scenario when RoPE off passes (frequencies off, even by a length-dependent amount);
7. which rows are wrong: exact-zero rows after a sequence's first token (skipped blocks: `tiling`, unless they are
   the rows where an unshifted exp overflows); only the last token, only where positions are not 0..S-1 (a decode
   path's position: `rope`);
8. the pattern of failing scenarios: one token (projections), all positions 0 passing (RoPE), only non-contiguous
   positions (position_ids), only long unequal distances (frequencies), every sequence above a length (tiling),
   only padding, only x50 scores (softmax stability), only half precision.

Non-finite rows, or zero rows, exactly where some score passes log(max) of a dtype are an exp that overflowed in that
dtype: float16 (scores past 11.09) names `softmax_precision`, float32 (past 88.72) `softmax`.

A passing but imprecise implementation gets `diagnose_precision`: the error's signature, then the precision probes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from harness.reference import Reference, additive_mask
from harness.verify.diagnosis.evidence import MAX_SUSPECT_LEN, Call, Diagnosis, Run
from harness.verify.diagnosis.probes import ask, precision_probes, probes
from harness.verify.diagnosis.signature import layer_case, layer_signature, overflow_dtype
from harness.verify.diagnosis.suspects import rope_fit, suspects
from harness.verify.scenarios import tagged


def diagnose(fixture, runs: dict[str, Run], failing: list[str], passing: list[str], call: Call | None = None,
             fn: Callable | None = None) -> Diagnosis:  # fmt: skip
    """runs: every scenario's evidence; call(x, weights, pos, mask) runs the implementation again (probes);
    fn: the implementation itself when it runs in this process (stage-by-stage for built-ins)."""
    config = fixture.layer_config  # what the code under test was handed (layer_idx, layer_type)
    weights = {k: v.float() for k, v in fixture.weights.items()}
    steps = (
        lambda: _nonfinite(config, weights, failing, runs),
        lambda: _stagewise(config, weights, fn, runs),
        lambda: layer_signature(config, weights, runs, failing),
        lambda: suspects(config, weights, runs, failing),
        lambda: probes(config, weights, runs, failing, call),
        lambda: rope_fit(config, weights, runs, failing),
        lambda: _row_pattern(config, weights, failing, runs),
    )
    for step in steps:
        found = step()
        if found is not None:
            return found
    return _pattern(failing, passing, runs)


def _nonfinite(config, w, failing, runs) -> Diagnosis | None:
    bad = [n for n in failing if not torch.isfinite(runs[n].out).all()]
    if not bad:
        return None
    empty_rows = any(not runs[n].keep.all() for n in bad)  # a scenario where some rows see no key at all
    overflow = _overflow(config, w, runs, bad, lambda n: ~torch.isfinite(runs[n].out).all(-1))
    if overflow == torch.float16:
        return _HALF_OVERFLOW
    if overflow is not None or set(bad) <= tagged("large_scores"):
        return Diagnosis("softmax", "NaN/Inf only when scores are in the thousands: exp overflows; subtract the "
                         "row max before exp (and keep the running max in a tiled loop)", "overflow")  # fmt: skip
    hint = "NaN/Inf in the output" + (
        " of rows whose every key is masked (padding): a fully masked row must give zeros, not a softmax over "
        "all -inf" if empty_rows else f" (scenarios: {', '.join(bad)})"
    )
    return Diagnosis("nonfinite", hint)


def _stagewise(config, w, fn, runs) -> Diagnosis | None:
    try:
        if fn is None or "return_intermediates" not in inspect.signature(fn).parameters or "short" not in runs:
            return None
    except (TypeError, ValueError):
        return None
    r = runs["short"]
    x, pos, mask = r.x.float(), r.pos, r.mask
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
    checks = [("v", v, "projection"), ("q", q, "rope"), ("k", k, "rope"), ("scores", scores, "scale"),
              ("probs", probs, "softmax"), ("context", ctx, "gqa")]  # fmt: skip
    for name, want, stage in checks:
        got = st.get(name)
        if got is None or got.shape != want.shape or (got.float() - want).abs().max() > 1e-4:
            return Diagnosis(stage, f"stage-by-stage: '{name}' is the first intermediate that differs from "
                             "transformers'", f"intermediate:{name}")  # fmt: skip
    return Diagnosis("output_projection", "every intermediate matches transformers' up to the context: the head "
                     "merge or o_proj is wrong", "intermediate:output")  # fmt: skip


_HALF_OVERFLOW = Diagnosis("softmax_precision", "the broken rows are exactly those with a score past 11.09, where exp "
                           "overflows in float16: the softmax runs in float16 without subtracting the row max; "
                           "compute it in float32, subtracting the max", "overflow:float16")  # fmt: skip


def _overflow(config, w, runs, names, broken) -> torch.dtype | None:
    """The dtype whose unshifted exp overflows on just the broken rows (broken(name) -> (B, S) bool) of every
    scenario among `names` short enough to recompute; None when they disagree or none is."""
    found = set()
    for n in names:
        r = runs[n]
        if r.x.shape[1] > MAX_SUSPECT_LEN:
            continue
        case = layer_case(config, w, r.x, r.pos, r.mask)
        found.add(overflow_dtype(case.scores(), case.allowed, broken(n), r.keep))
    return found.pop() if len(found) == 1 else None


def _row_pattern(config, w, failing, runs) -> Diagnosis | None:
    """Rows of exact zeros where tokens are (skipped blocks, or an overflow flushed to zero), or only the last token
    of each sequence (a decode path), seen on every failing scenario."""
    zero_rows, last_only, zeros = False, bool(failing), {}
    for n in failing:
        r = runs[n]
        keep = r.keep  # (B, S)
        first = keep.float().argmax(-1, keepdim=True)  # (B, 1) the first real token of each row
        after_first = keep & (torch.arange(r.x.shape[1])[None] > first)  # (B, S)
        zero = (r.out.float().abs().amax(-1) == 0) & (r.ref.float().abs().amax(-1) > 0)  # (B, S)
        zero_rows |= bool((zero & after_first).any())  # a first token that sees nothing can be 0; later ones not
        zeros[n] = zero
        err = (r.out.double() - r.ref.double()).abs().amax(-1).masked_fill(~keep, 0)  # (B, S)
        last_only &= r.x.shape[1] > 1 and bool(err[:, -1].max() > 0) and bool(err[:, :-1].max() <= 1e-2 * err.max())
    overflow = (
        _overflow(config, w, runs, [n for n in zeros if zeros[n].any()], zeros.__getitem__) if zero_rows else None
    )
    if overflow == torch.float16:
        return _HALF_OVERFLOW
    if overflow == torch.float32:
        return Diagnosis("softmax", "the rows that come out zero are exactly those with a score past 88.72, where exp "
                         "overflows in float32: subtract the row max before exp", "overflow:zero_rows")  # fmt: skip
    if zero_rows:
        return Diagnosis("tiling", "whole output rows are exactly zero where tokens are: query or key blocks were "
                         "skipped (the last partial block dropped? loop over ceil(S / block) blocks, not "
                         "S // block)", "zero_rows")  # fmt: skip
    if last_only and set(failing) <= tagged("positions"):
        return Diagnosis("rope", "only the last token is wrong, and only where positions are not 0..S-1: a decode "
                         "(KV-cache) path places the new token at the cache length; rotate it by its position_ids",
                         "last_token")  # fmt: skip
    return None


def _pattern(failing, passing, runs) -> Diagnosis:
    f, p = set(failing), set(passing)
    if "one_token" in f:
        return Diagnosis("projection", "even a single token (which attends only to itself) is wrong: check the "
                         "q/k/v/o projections, the head split and merge, and the KV-head mapping", "one_token")
    contiguous = {n for n in runs if n not in tagged("positions") and n != "one_token"}
    if f and f <= tagged("positions") and "zero_positions" in f and (p & contiguous):
        return Diagnosis("rope", "wrong only where positions are not 0..S-1 (padding, restarts, sparse, all zero): "
                         "position_ids look ignored or misread; rotate each token by its own position_ids "
                         "(RoPE is relative, so contiguous positions hide this)", "positions")  # fmt: skip
    if f and f <= {"sparse_positions", "packed", "rope_stress"}:
        return Diagnosis("rope_frequencies", "only unequal long distances between positions fail: the rotary "
                         "frequencies are off (rope_theta, rope scaling, float32 angles)", "sparse_positions")
    if "window_edge" in f and f <= {"window_edge", "len_257", "len_1000", "long_2048"}:
        return Diagnosis("sliding_window", "only sequences longer than the sliding window fail: on a sliding layer "
                         "each query sees itself and the sliding_window - 1 keys before it; a full-attention layer "
                         "sees every earlier key", "window_edge")  # fmt: skip
    fl = {n: runs[n].x.shape[1] for n in f if runs[n].dtype == torch.float32}  # failing float32 lengths
    pl = {n: runs[n].x.shape[1] for n in p if runs[n].dtype == torch.float32}
    if fl and pl and min(fl.values()) > max(pl.values()):
        return Diagnosis("tiling", f"every float32 sequence of {min(fl.values())} tokens or more fails and every "
                         "shorter one passes: a block-size effect (the accumulator rescaling across key blocks, the "
                         "last partial block, the diagonal blocks' mask)", "length")  # fmt: skip
    if "zero_positions" in p and (f & {"short", "prompt", "sparse_positions", "packed"}):
        return Diagnosis("rope", "correct with every position 0 (RoPE off) but wrong otherwise: the rotary "
                         "embedding is applied wrongly", "zero_positions")
    if f == {"left_padding"}:
        return Diagnosis("padding_mask", "only the padded batch fails: check how attention_mask (1 = token, "
                         "0 = padding) masks the keys", "left_padding")
    if f <= {"len_257", "len_1000", "long_2048"} and "short" in p:
        return Diagnosis("tiling", "short sequences pass but lengths off the block grid fail: check the last "
                         "partial block and the masking of diagonal blocks", "len_257")
    if f and f <= tagged("large_scores"):
        return Diagnosis("softmax", "only inputs scaled x50 fail: the softmax is not stable (subtract the running "
                         "max; rescale the accumulator when the max changes)", "scaled_x50")
    if f <= {"bfloat16", "float16"}:
        return Diagnosis("softmax", "only half precision fails: do the softmax and the accumulation in float32",
                         "half")
    return Diagnosis("unknown", "no single stage explains the failures: " + ", ".join(sorted(f)))


def diagnose_precision(fixture, runs: dict[str, Run], imprecise: list[str], call: Call | None) -> Diagnosis:
    """imprecise: the scenarios that pass the gate with a precision ratio above the limit. The step whose rounding
    to bfloat16 or float16 the error matches (signature.py), then probes: how the error moves with the positions,
    the scores' magnitude and the length."""
    config = fixture.layer_config  # what the code under test was handed (layer_idx, layer_type)
    w = {k: v.float() for k, v in fixture.weights.items()}
    found = layer_signature(config, w, runs, imprecise)
    if found is not None:
        return found
    if call is not None:
        found = ask(precision_probes, config, w, runs, imprecise, call)
        if found is not None:
            return found
    return Diagnosis("unknown", "no single step explains the lost precision: " + ", ".join(sorted(imprecise)))
