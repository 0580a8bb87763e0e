"""The diagnosis of a kernel's window, softcap and sinks (stages sliding_window, softcap, sinks), run when only
scenarios using those keywords fail and a scenario using none passes: the probes first (feature_probes.py: what the
kernel does, measured), then transformers' functions (kernel_hf.py) re-run in float64 under suspected mistakes (an
edge of the window moved, the window not applied or aligned top-left; the cap missing or applied before the scale;
the sinks missing, negated or read by KV head), the one the failing outputs match kept. What neither explains goes
on to the catalog's suspects and the pattern of failing scenarios (diagnosis/kernel.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.verify import kernel_hf
from harness.verify.diagnosis import feature_probes
from harness.verify.diagnosis.evidence import Diagnosis, rms
from harness.verify.kernels import KEYWORDS

STAGE = {"window": "sliding_window", "softcap": "softcap", "sinks": "sinks"}
WHAT = {"window": "a window", "softcap": "softcap", "sinks": "sinks"}
PROBES = {"window": feature_probes.window, "softcap": feature_probes.softcap, "sinks": feature_probes.sinks}
SUSPECT_SIZE = 300 * 300  # Sq * Sk of the float32 scenarios the suspects are re-run on (as the catalog's)


def implicated(runs: dict, failing: list[str], passing: list[str]) -> list[str]:
    """The keywords the failures point at (KEYWORDS order): every failing scenario uses one and a scenario using
    none passes; those every failing scenario uses, else any of them."""
    uses = [set(runs[n].s.uses()) for n in failing]
    if not uses or not all(uses) or not any(n in runs and not runs[n].s.uses() for n in passing):
        return []
    common = set.intersection(*uses) or set.union(*uses)
    return [k for k in KEYWORDS if k in common]


def diagnose(runs: dict, failing: list[str], passing: list[str], call) -> Diagnosis | None:
    """The probes of the implicated keywords, then the reference under suspected mistakes; None: neither."""
    kws = implicated(runs, failing, passing)
    if call is not None:
        for kw in kws:
            found = PROBES[kw](call)
            if found is not None:
                return found
    return suspects(runs, failing, kws) if kws else None


def lse_only(runs: dict, failing: list[str], call) -> Diagnosis | None:
    """out right everywhere, lse wrong only with sinks (and right without): the sink's term in lse."""
    others = [n for n, r in runs.items() if r.lse_err is not None and r.s.sinks is None]
    if not failing or not others or not all(runs[n].s.sinks is not None for n in failing):
        return None
    found = feature_probes.sinks(call, lse_only=True) if call is not None else None
    if found is not None:
        return found
    worst = max(runs[n].lse_err for n in failing)
    return Diagnosis("sinks", f"out matches everywhere and lse without sinks, but lse is off with sinks (by "
                     f"{worst:.2e}): lse = log(exp(sinks[h]) + sum_j exp(s_j)), the sink's term included",
                     "sinks_lse")  # fmt: skip


def pattern(f: set, runs: dict) -> Diagnosis | None:
    """Only scenarios with one keyword fail (diagnosis/kernel.py's pattern, before its precision fall-backs)."""
    for kw in KEYWORDS:
        if f and all(kw in runs[n].s.uses() for n in f):
            return Diagnosis(STAGE[kw], f"only scenarios with {WHAT[kw]} fail ({', '.join(sorted(f)[:6])}"
                             f"{' ...' if len(f) > 6 else ''}), and no probe or suspected mistake explains how: "
                             f"check {kw} against the contract (harness/verify/contracts/core.py)", f"only_{kw}")
    return None


def keywords(s, c) -> dict:
    """The scenario's optional keywords, as a kernel takes them (unset ones absent; contracts/core.py's call)."""
    return ({"window": s.window} if s.window is not None else {}) | ({"softcap": s.softcap} if s.softcap else {}) \
        | ({"sinks": c.sinks} if c.sinks is not None else {})


# ---------------------------------------------------------------------------------------------------------
# suspected mistakes: transformers' functions on changed arguments


def _moved(window, left: int = 0, right: int = 0):
    """The window with an edge moved; None where that edge is unbounded or would go below 0 (masking_utils reads
    a negative edge as unbounded: the suspect does not apply there)."""
    L, R = kernel_hf.bounds(window)
    if (left and L is None) or (right and R is None):
        return None
    moved = (None if L is None else L + left, None if R is None else R + right)
    return None if any(w is not None and w < 0 for w in moved) else moved


def _keep(s, c, window) -> torch.Tensor | None:
    """(B, 1, Sq, Sk) bool for the scenario with another window (None: the suspect does not apply)."""
    if window is None:
        return None
    return kernel_hf.allowed(c.q.shape[0], s.Sq, s.Sk, s.causal, window, c.mask)


def _top_left(s, c) -> torch.Tensor:
    """The window placed around query index i (rows of the Sk x Sk window), the causal mask bottom-right."""
    B = c.q.shape[0]
    around_i = kernel_hf.allowed(1, s.Sk, s.Sk, False, s.window, None)[:, :, : s.Sq]
    return kernel_hf.allowed(B, s.Sq, s.Sk, s.causal, None, c.mask) & around_i


def _window_suspects() -> list[tuple[str, str, Callable]]:
    edge = "transformers' sliding_window W is (W - 1, 0)"
    return [
        ("window_left_plus_1", "the output matches transformers' with the window's left edge one key further "
         f"((left + 1, right)): one key too many at the window's left edge ({edge}); keep key j when p - left <= j",
         lambda s, c: {"keep4": _keep(s, c, _moved(s.window, left=1))}),
        ("window_left_minus_1", "the output matches transformers' with the window's left edge one key nearer "
         f"((left - 1, right)): the key at the window's left edge is missed ({edge}); keep key j when p - left <= j",
         lambda s, c: {"keep4": _keep(s, c, _moved(s.window, left=-1))}),
        ("window_right_plus_1", "the output matches transformers' with the window's right edge one key further "
         "((left, right + 1)): keep key j when j <= p + right", lambda s, c: {"keep4": _keep(s, c, _moved(
             s.window, right=1))}),
        ("window_right_minus_1", "the output matches transformers' with the window's right edge one key nearer "
         "((left, right - 1)): keep key j when j <= p + right", lambda s, c: {"keep4": _keep(s, c, _moved(
             s.window, right=-1))}),
        ("window_unapplied", "the output matches transformers' without the window: apply it, key j visible only if "
         "p - left <= j <= p + right", lambda s, c: {"keep4": kernel_hf.allowed(c.q.shape[0], s.Sq, s.Sk, s.causal,
                                                                               None, c.mask)}),
        ("window_top_left_aligned", "the output matches transformers' with the window placed around query index i: "
         "windows are bottom-right aligned like the causal mask, query i at p = Sk - Sq + i sees p - left .. "
         "p + right", lambda s, c: {"keep4": _top_left(s, c)}),
    ]  # fmt: skip


def _by_kv(c, how: str) -> torch.Tensor:
    H, Hkv = c.q.shape[1], c.k.shape[1]
    h = torch.arange(H)
    return c.sinks[h // (H // Hkv) if how == "div" else h % Hkv]


SUSPECTS = {
    "window": _window_suspects(),
    "softcap": [
        ("softcap_uncapped", "the output matches transformers' without the cap: apply softcap * tanh(scores / "
         "softcap) after the scale", lambda s, c: {"softcap": 0.0}),
        ("softcap_unscaled", "the output matches transformers' with the cap applied before the scale (softcap x "
         "scale): cap the scaled scores, softcap * tanh(scale q k^T / softcap)",
         lambda s, c: {"softcap": s.softcap * (s.d**-0.5 if s.scale is None else s.scale)}),
    ],
    "sinks": [
        ("sinks_absent", "the output matches transformers' without sinks: the softmax's denominator gets "
         "exp(sinks[h])", lambda s, c: {"sinks": None}),
        ("sinks_negated", "the output matches transformers' with the sinks negated: the denominator gets "
         "exp(sinks[h]), not exp(-sinks[h])", lambda s, c: {"sinks": -c.sinks}),
        ("sinks_kv_div", "the output matches transformers' with query head h given sinks[h // g] (its KV head's "
         "index): one sink logit per query head, sinks[h]", lambda s, c: {"sinks": _by_kv(c, "div")}),
        ("sinks_kv_mod", "the output matches transformers' with query head h given sinks[h % Hkv]: one sink logit "
         "per query head, sinks[h]", lambda s, c: {"sinks": _by_kv(c, "mod")}),
    ],
}  # fmt: skip


def suspects(runs: dict, failing: list[str], kws: list[str]) -> Diagnosis | None:
    """The suspected mistake of the implicated keywords the failing float32 outputs match best (as the catalog's
    suspects are matched: much nearer the suspect than the reference, everywhere)."""
    names = [n for n in failing if runs[n].s.dtype == torch.float32 and runs[n].s.Sq * runs[n].s.Sk <= SUSPECT_SIZE]
    best = None
    for kw in kws:
        for name, hint, change in SUSPECTS[kw]:
            worst = _match(runs, [n for n in names if kw in runs[n].s.uses()], change)
            if worst is not None and (best is None or worst < 0.99 * best[2]):
                best = (STAGE[kw], hint, worst, name)
    return None if best is None else Diagnosis(best[0], best[1], "suspect:" + best[3])


def _match(runs: dict, names: list[str], change) -> float | None:
    worst = None
    for n in names:
        r = runs[n]
        s, c = r.s, r.c
        args = {"keep4": kernel_hf.allowed(c.q.shape[0], s.Sq, s.Sk, s.causal, s.window, c.mask),
                "softcap": s.softcap, "sinks": c.sinks}  # fmt: skip
        try:
            args |= change(s, c)
            if args["keep4"] is None:
                return None
            with torch.no_grad():
                sus = kernel_hf.forward(c.q.double(), c.k.double(), c.v.double(), args["keep4"],
                                        s.d**-0.5 if s.scale is None else s.scale, args["softcap"], args["sinks"],
                                        path="float64")  # fmt: skip
        except Exception:  # noqa: BLE001 - a suspect that cannot be computed here explains nothing
            return None
        keep = c.keep[:, None, :, None].expand_as(r.out)
        got, base = rms(r.out, sus, keep), rms(r.out, c.ref, keep)
        if not got <= 0.3 * base + 2 * rms(c.ref, c.ref64, keep):
            return None
        worst = max(worst or 0.0, got / max(base, 1e-30))
    return worst
