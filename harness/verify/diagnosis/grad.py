"""The diagnosis of gradients (`--grad`): grad_nonfinite; the catalog's backward bugs as suspects (re-run in
float64); then which gradients are wrong: a constant factor on dq/dk (grad_scale), only padding (grad_mask), only
the K/V side of a shared head (grad_gqa), right with RoPE off (grad_rope), o_proj's or the value path's
(grad_projection), dq/dk with dv right or only the sinks' gradient (grad_softmax), else grad_unknown."""

from __future__ import annotations

import torch

from harness.bugs import catalog
from harness.verify.diagnosis.evidence import Diagnosis, rms
from harness.verify.grads import WEIGHTS, GradRun, as_rows


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
        got = rms(a, b, keep)
        base = rms(a, as_rows(r.ref[k]), keep)
        noise = rms(as_rows(r.ref[k]), as_rows(r.ref64[k]), keep)
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
    if names == {"sinks"}:  # q, k and v right: the sinks' own gradient, the softmax backward's sink column
        c, resid = _factor(r.got["sinks"], r.ref["sinks"])
        seen = f"dsinks looks multiplied by {c:.3g}" if resid < 1e-2 else "only dsinks is wrong"
        return Diagnosis("grad_softmax", f"{seen} (dq, dk, dv right): dsinks[h] = -sum over rows of P_sink * D, "
                         "P_sink = exp(sinks[h] - lse), D = rowsum(dO * O)", "dsinks")  # fmt: skip
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
