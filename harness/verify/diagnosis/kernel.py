"""The diagnosis of a kernel (`--core`): when only scenarios using window, softcap or sinks fail, their probes and
suspected mistakes (features.py); the catalog's kernel bugs as suspects (but its precision bugs), the error's
signature (which step, rounded to half precision, leaves it: signature.py), a fitted scale, a GQA-mapping probe,
then the pattern of failing scenarios (Sq < Sk only: causal alignment; non-causal only: the causal flag; only
window scenarios: the window; ...)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.bugs import catalog, pipeline
from harness.verify.diagnosis import features
from harness.verify.diagnosis.evidence import Diagnosis, maxdiff, rms
from harness.verify.diagnosis.signature import KERNEL_WAYS, SCENARIOS, explain, kernel_case, signatures
from harness.verify.diagnosis.suspects import PRECISION, fit
from harness.verify.kernels import KernelCase, KernelScenario


@dataclass
class KernelRun:
    s: KernelScenario
    c: KernelCase
    out: torch.Tensor
    lse_err: float | None  # None: no lse returned (or it failed the out check first)


def diagnose_kernel(runs: dict[str, KernelRun], failing: list[str], passing: list[str], call) -> Diagnosis:
    """failing/passing: scenario names whose out failed (lse failures are separate: 'name:lse')."""
    out_fail = [n for n in failing if not n.endswith(":lse")]
    lse_fail = [n[:-4] for n in failing if n.endswith(":lse")]
    if not out_fail and lse_fail:
        found = features.lse_only(runs, lse_fail, call)
        if found is not None:
            return found
        return Diagnosis("lse", f"out matches but lse is off (by {max(runs[n].lse_err for n in lse_fail):.2e}): lse "
                         "must be the natural log of the row sum of exp(scale q k^T) over the allowed keys, "
                         "m + log(l), float32", "lse")  # fmt: skip
    found = features.diagnose(runs, out_fail, passing, call)
    if found is not None:
        return found
    bad = [n for n in out_fail if not torch.isfinite(runs[n].out[rows_keep(runs[n])]).all()]
    if bad:
        if set(bad) <= {"scores_x25"}:
            return Diagnosis("softmax", "NaN/Inf only when scores are in the thousands: exp overflows; subtract "
                             "the running max before exp", "overflow")  # fmt: skip
        return Diagnosis("nonfinite", f"NaN/Inf in rows that see keys (scenarios: {', '.join(bad)})")
    fp32 = [n for n in out_fail if runs[n].s.dtype == torch.float32 and runs[n].s.Sq * runs[n].s.Sk <= 300 * 300]
    if fp32:
        best = None
        found = [(b.name, b.stage, b.hint, b.kernel()) for b in catalog.kernel_suspects() if b.stage not in PRECISION]
        for name, stage, hint, fn in found:
            worst = _match(fn, runs, fp32)
            if worst is not None and (best is None or worst < 0.99 * best[3]):
                best = (name, stage, hint, worst)
        if best is not None:
            return Diagnosis(best[1], best[2], best[0])
        found = _signature(runs, fp32) or _scale_fit(runs, fp32)
        if found is not None:
            return found
    if "one_token" in out_fail and call is not None:
        try:
            found = _head_mapping(call)
        except Exception:  # noqa: BLE001 - a probe the kernel cannot answer decides nothing
            found = None
        if found is not None:
            return found
    return _pattern(set(out_fail), set(passing), runs)


def diagnose_precision(runs: dict[str, KernelRun], imprecise: list[str]) -> Diagnosis:
    """A kernel that passes but is far less precise: the step whose rounding to bf16 or fp16 its error matches."""
    names = [n for n in imprecise if runs[n].s.dtype == torch.float32 and runs[n].s.Sq * runs[n].s.Sk <= 300 * 300]
    found = _signature(runs, names)
    if found is not None:
        return found
    return Diagnosis("unknown", "no single step explains the lost precision: " + ", ".join(sorted(imprecise)))


def _signature(runs: dict[str, KernelRun], names: list[str]) -> Diagnosis | None:
    """signature.py on the shortest few of `names` whose outputs are finite and that use none of window, softcap,
    sinks (its simulations are plain attention's)."""
    observed, sims = [], []
    usable = [n for n in names if torch.isfinite(runs[n].out[rows_keep(runs[n])]).all() and not runs[n].s.uses()]
    for n in sorted(usable, key=lambda n: runs[n].s.Sq * runs[n].s.Sk)[:SCENARIOS]:
        r = runs[n]
        keep = rows_keep(r)
        observed.append((r.out.double() - r.c.ref64.double())[keep])
        sims.append(signatures(kernel_case(r.c.q, r.c.k, r.c.v, r.s.causal, r.s.scale, r.c.mask), keep, KERNEL_WAYS))
    found = explain(observed, sims) if observed else None
    return None if found is None else Diagnosis(found.stage, found.hint, found.name)


def rows_keep(r: KernelRun) -> torch.Tensor:
    return r.c.keep[:, None, :, None].expand_as(r.out)


def _match(fn, runs, names) -> float | None:
    worst = 0.0
    for n in names:
        r = runs[n]
        try:
            with torch.no_grad():
                sus = fn(r.c.q.double(), r.c.k.double(), r.c.v.double(), causal=r.s.causal, scale=r.s.scale,
                         attention_mask=r.c.mask, **features.keywords(r.s, r.c))  # fmt: skip
            sus = sus[0] if isinstance(sus, tuple) else sus
        except Exception:  # noqa: BLE001
            return None
        keep = rows_keep(r)  # the same criterion as a layer's suspects (diagnose._match)
        got, base = rms(r.out, sus, keep), rms(r.out, r.c.ref, keep)
        if not got <= 0.3 * base + 2 * rms(r.c.ref, r.c.ref64, keep):
            return None
        worst = max(worst, got / max(base, 1e-30))
    return worst


def _scale_fit(runs, names) -> Diagnosis | None:
    names = [n for n in names if not runs[n].s.uses()]  # the fitted kernel is plain attention
    if not names:
        return None
    probe = max(names, key=lambda n: runs[n].s.Sk > 1)
    r = runs[probe]
    if r.s.Sk == 1:
        return None
    d = r.s.d
    base = d**-0.5 if r.s.scale is None else r.s.scale

    def fn_for(a):
        return lambda q, k, v, *, causal, scale, attention_mask: pipeline.core()(
            q, k, v, causal=causal, scale=(d**-0.5 if scale is None else scale) * a, attention_mask=attention_mask)

    def resid(t):
        return _match_err(fn_for(2.0**t), r)

    a = 2.0 ** fit(resid, [i / 4 for i in range(-32, 33)])
    if abs(a - 1) < 1e-3 or _match(fn_for(a), runs, names) is None:
        return None
    return Diagnosis("scale", f"scores look multiplied by {a:.4g}x the expected scale ({base:.4g} on {probe}): "
                     "use scale if given, else 1/sqrt(head_dim)", "scale_fit")  # fmt: skip


def _match_err(fn, r: KernelRun) -> float:
    with torch.no_grad():
        sus = fn(r.c.q.double(), r.c.k.double(), r.c.v.double(), causal=r.s.causal, scale=r.s.scale,
                 attention_mask=r.c.mask)  # fmt: skip
    return maxdiff(r.out, sus, rows_keep(r))


def _head_mapping(call) -> Diagnosis | None:
    """One key: query head h's output is the value of its KV head. v of KV head j = j + 1 reads the map off."""
    H, Hkv, d = 8, 2, 64
    q, k = torch.zeros(1, H, 1, d), torch.zeros(1, Hkv, 1, d)
    v = (torch.arange(Hkv, dtype=torch.float32) + 1)[None, :, None, None].expand(1, Hkv, 1, d).contiguous()
    out, _ = call(q, k, v, causal=True, scale=None, mask=None)
    got = out[0, :, 0, 0].double()
    used = torch.round(got) - 1
    if (got - (used + 1)).abs().max() > 1e-3:
        return None
    want = [h // (H // Hkv) for h in range(H)]
    if [int(u) for u in used] == want:
        return None
    shown = ", ".join(f"{h}->{int(u)}" for h, u in enumerate(used))
    return Diagnosis("gqa", f"query heads read KV heads {shown} (8 query heads, 2 KV heads); expected h -> h // g "
                     "(KV head j serves query heads j*g..j*g+g-1)", "probe:head_mapping")  # fmt: skip


def _pattern(f: set, p: set, runs) -> Diagnosis:
    found = features.pattern(f, runs)
    if found is not None:
        return found
    shifted = {n for n, r in runs.items() if r.s.Sq < r.s.Sk and r.s.causal}
    if f and f <= shifted and p & {"prefill_17", "noncausal", "padding"}:
        return Diagnosis("causal_mask", "only causal cases with fewer queries than keys fail: the causal mask is "
                         "aligned top-left; the queries are the last Sq of Sk keys (query i sees keys up to "
                         "Sk - Sq + i)", "bottom_right")  # fmt: skip
    noncausal = {n for n, r in runs.items() if not r.s.causal}
    if f and f <= noncausal:
        return Diagnosis("causal_mask", "only causal=False cases fail: the causal flag is not honoured",
                         "causal_flag")
    if f == {"padding"}:
        return Diagnosis("padding_mask", "only the padded batch fails: mask keys where attention_mask is 0 "
                         "(1 = key, 0 = padding)", "padding")
    if f and all(runs[n].s.scale is not None for n in f):
        return Diagnosis("scale", "only a given scale fails: use scale when it is not None", "scale_arg")
    if f <= {"scores_x25"} and f:
        return Diagnosis("softmax", "only scores in the thousands fail: subtract the running max; rescale the "
                         "accumulator when it changes", "scores_x25")
    fl = {runs[n].s.Sk for n in f if runs[n].s.dtype == torch.float32}
    pl = {runs[n].s.Sk for n in p if runs[n].s.dtype == torch.float32}
    if fl and pl and min(fl) > max(pl):
        return Diagnosis("tiling", f"every float32 case with {min(fl)} keys or more fails and every shorter one "
                         "passes: a block effect (the rescaling across key blocks, the last partial block, the "
                         "diagonal block's mask)", "length")  # fmt: skip
    if f and all(runs[n].s.dtype != torch.float32 for n in f):
        return Diagnosis("softmax", "only half precision fails: keep the softmax and the accumulator in float32",
                         "half")
    return Diagnosis("unknown", "no single stage explains the failures: " + ", ".join(sorted(f)))
