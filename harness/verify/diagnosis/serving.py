"""What the diagnoses of the serving contracts share (diagnosis/paged.py, diagnosis/varlen.py): the evidence, the
distances, the verdict's order, and what is left when no probe of the contract's own names the failure:

    own probes  the contract's (paged.py, varlen.py): a block table, lengths, neighbours, a split merge
    as a core   the kernel asked as a --core kernel through an adapter (dense q, k, v into a cache of pages, or
                packed), on the core matrix's float32 scenarios without padding: their failures go to the kernel
                diagnosis (diagnosis/kernel.py: the keyword probes, the catalog's suspects, the scale fit, ...)
    pattern     what the failing scenarios share (only half precision, one page size, only chunked prefill, ...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.verify import kernels
from harness.verify.compare import compare
from harness.verify.diagnosis import features
from harness.verify.diagnosis.evidence import Diagnosis
from harness.verify.diagnosis.kernel import KernelRun, diagnose_kernel

GATE = 1e-3  # float32's promise (compare.py): within it, the output is the one simulated
STILL = 1e-4  # an output that must not move has moved: more than float32 noise on outputs of order 1


@dataclass
class ServingRun:
    """One scenario's evidence (paged or varlen)."""

    s: object  # PagedScenario or VarlenScenario
    c: object  # PagedCase or VarlenCase
    out: torch.Tensor
    lse_err: float | None


def ask(probe: Callable[[], Diagnosis | None]) -> Diagnosis | None:
    """A probe's answer; None when the kernel cannot answer it (that decides nothing)."""
    try:
        return probe()
    except Exception:  # noqa: BLE001 - whatever the kernel (or its contract check) raises
        return None


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, NaN counted as infinite."""
    d = torch.nan_to_num((a.double() - b.double()).abs(), nan=float("inf"))
    return float(d.max()) if d.numel() else 0.0


def seq_err(a, b) -> list[float]:
    """Per sequence (a batch's first dimension, or lists of per-sequence outputs): max |a - b|."""
    return [err(a[i], b[i]) for i in range(len(b))]


def moved(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Did an output that should stay put move (NaN in the same places counts as staying)?"""
    return not torch.allclose(a.double(), b.double(), rtol=0.0, atol=STILL, equal_nan=True)


def matches(out, want: list, right: list) -> bool:
    """The output (a batch, or a list of per-sequence outputs) is `want` (within GATE) on every sequence it is defined
    for, and `want` is not the right answer there (GATE apart) on at least one."""
    known = [(i, w) for i, w in enumerate(want) if w is not None]
    return bool(known) and all(err(out[i], w) <= GATE for i, w in known) \
        and any(err(w, right[i]) > GATE for i, w in known)


# ---------------------------------------------------------------------------------------------------------
# the verdict


def lse_verdict(runs: dict, lse_fail: list[str], core_call) -> Diagnosis:
    found = features.lse_only(runs, lse_fail, core_call)
    if found is not None:
        return found
    return Diagnosis("lse", f"out matches but lse is off (by {max(runs[n].lse_err for n in lse_fail):.2e}): lse must "
                     "be the natural log of the row sum of exp(scale q k^T) over the keys the row sees, float32",
                     "lse")  # fmt: skip


def as_core_runs(core_call, cache: dict) -> tuple[dict, list[str], list[str]]:
    """(runs, failing, passing) of the kernel asked as a --core kernel on the core matrix's quick float32 scenarios
    without padding (the adapters take none); references shared with --core through `cache`."""
    runs, failing, passing = {}, [], []
    for s in kernels.SCENARIOS:
        if not s.quick or s.pads or s.dtype != torch.float32:
            continue
        c = kernels.reference(s, cache)
        try:
            out, lse = core_call(c.q, c.k, c.v, causal=s.causal, scale=s.scale, mask=None,
                                 **features.keywords(s, c))  # fmt: skip
        except Exception:  # noqa: BLE001 - a case the adapter or the kernel cannot take decides nothing
            continue
        cmp = compare(kernels.rows_of(out), kernels.rows_of(c.ref), kernels.rows_of(c.ref64), c.keep, s.dtype)
        runs[s.name] = KernelRun(s, c, out, None if lse is None else kernels.lse_error(lse, c))
        (passing if cmp.passed else failing).append(s.name)
    return runs, failing, passing


def as_core(core_call, cache: dict) -> Diagnosis | None:
    """The kernel diagnosis of the kernel asked as a --core kernel; None when it passes there or names nothing."""
    runs, failing, passing = as_core_runs(core_call, cache)
    if not failing:
        return None
    found = diagnose_kernel(runs, failing, passing, core_call)
    if found.stage == "unknown":
        return None
    return Diagnosis(found.stage, f"asked as a --core kernel (the same keys, one sequence per batch row), it fails "
                     f"{', '.join(failing[:4])}{' ...' if len(failing) > 4 else ''}: {found.hint}",
                     f"as_core:{found.matched}")  # fmt: skip


def pattern(f: set, p: set, runs: dict, *, paged: bool) -> Diagnosis:
    """What the failing scenarios share, when no probe measured it."""
    found = features.pattern(f, runs)
    if found is not None:
        return found
    if f and all(runs[n].s.dtype != torch.float32 for n in f):
        return Diagnosis("softmax", "only half precision fails: keep the softmax and the accumulator in float32",
                         "half")
    if paged:
        fp, pp = {runs[n].s.page for n in f}, {runs[n].s.page for n in p}
        if f and pp and not fp & pp:
            return Diagnosis("block_table", f"only page size {', '.join(map(str, sorted(fp)))} fails (page "
                             f"{', '.join(map(str, sorted(pp)))} passes): the page size enters an address "
                             "(block_table[b, t // page_size], slot t % page_size)", "page_size")  # fmt: skip
        if f and all(runs[n].s.Sq > 1 for n in f) and any(runs[n].s.Sq == 1 for n in p):
            return Diagnosis("causal_mask", "only chunked prefill (several new tokens) fails, decoding passes: "
                             "query i sits at cache_seqlens[b] - Sq + i", "chunk")  # fmt: skip
    if f and all(not runs[n].s.causal for n in f):
        return Diagnosis("causal_mask", "only causal=False scenarios fail: the causal flag is not honoured",
                         "causal_flag")
    return Diagnosis("unknown", "no single stage explains the failures: " + ", ".join(sorted(f)))


def diagnose(runs: dict, failing: list[str], passing: list[str], probes: Callable, core_call, cache: dict,
             paged: bool) -> Diagnosis:  # fmt: skip
    """failing: scenario names whose out failed, `name:lse` for an lse that failed. probes(out_fail) -> the
    contract's own probes' Diagnosis or None (raising: the kernel cannot answer them). cache: the core matrix's
    references."""
    out_fail = [n for n in failing if not n.endswith(":lse")]
    lse_fail = [n.removesuffix(":lse") for n in failing if n.endswith(":lse")]
    if not out_fail:
        return lse_verdict(runs, lse_fail, core_call)
    for step in (lambda: probes(out_fail), lambda: as_core(core_call, cache)):
        found = ask(step)
        if found is not None:
            return found
    return pattern(set(out_fail), set(passing), runs, paged=paged)
