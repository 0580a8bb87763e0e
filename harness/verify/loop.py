"""The one check loop: (contract, target, implementation) -> rows -> verdict, for any contract (contracts/).

    for each case:  the reference (cached) -> the code on copies of the inputs -> the contract's comparisons;
                    a case the code cannot take (the contract's `unsupported`: a keyword missing from its
                    signature) is skipped, a row with the reason and an entry of the verdict's `skipped`; it is
                    never a pass (report.py: counted apart; --strict fails the implementation)
    a fault:        an exception is `crash` (its traceback in the verdict), a dead worker `crash` with its exit
                    code or signal, a call past the deadline `timeout`, a wrong reply `contract`; after an
                    exception the code answers on, after a death or a timeout it is not called again
    then:           a fault is the verdict; else failures are diagnosed (the contract's diagnosis); else, with
                    --grad, the contract's gradient contract runs the same way; else passed, and an imprecise
                    pass gets the contract's precision diagnosis
Timing, deadlines, devices and the JSON records live here only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.common import UserError
from harness.verify import contracts
from harness.verify.compare import skipped as skipped_row
from harness.verify.plugins import Impl
from harness.verify.records import Row, Verdict, dtype_name
from harness.verify.worker import Fault


@dataclass
class Context:
    """What every check of one run shares."""

    dtypes: set
    quick: bool
    grad: bool = False
    timeout: float = 900.0  # per implementation and target
    device: str = "cpu"
    log: Callable = print
    cache: dict = field(default_factory=dict)  # references, keyed by contents: reusable across runs
    keep: dict | None = None  # (target, impl) -> evidence, for the pictures
    rows: list = field(default_factory=list)  # what was judged so far: a stopped run reports it
    verdicts: list = field(default_factory=list)


def judge(c, target, impl: Impl, ctx: Context, cases: list | None = None) -> tuple[list[Row], Verdict]:
    """One implementation on one target under contract c (a module of contracts/); the contract's `annotate`
    (optional) adds what it measured beside the comparisons (a ring's bytes) to the verdict."""
    evidence: dict = {}
    rows, v = _judge(c, target, impl, ctx, cases, evidence)
    if hasattr(c, "annotate"):
        c.annotate(v, evidence)
    return rows, v


def _judge(c, target, impl: Impl, ctx: Context, cases: list | None, evidence: dict) -> tuple[list[Row], Verdict]:
    cases = c.cases(target, ctx, impl) if cases is None else cases
    rows, failed, passing, fault, skipped = [], {}, [], None, []
    if ctx.keep is not None:
        ctx.keep[(target.name, impl.spec)] = evidence
    for case in cases:
        why = unsupported(c, target, case, impl) if fault is None or impl.alive else None
        if why is not None:
            rows.append(Row(target.name, impl.spec, case.name, dtype_name(case.dtype), 0.0, skipped_row(why),
                            check=c.FAULT_CHECK, skipped=why))  # fmt: skip
            skipped.append({"scenario": case.name, "why": why})
            continue
        ref = c.reference(target, case, ctx, impl.device)
        t0 = time.perf_counter()
        got = err = None
        if fault is None or impl.alive:  # after an exception it answers on; after a death or a timeout, not
            try:
                got = c.call(impl, target, case, ref)
            except Fault as e:
                fault, err = fault or e, e.message
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a built-in that raises: the same verdict as user code
                fault = fault or Fault("crash", f"raised {type(e).__name__}: {e}")
                err = fault.message
        else:
            err = f"not run: {fault.message}"
        seconds = time.perf_counter() - t0
        dt = dtype_name(case.dtype)
        if got is None:
            ctx.log(f"  {target.name} {impl.spec} {case.name}: {err}")
            rows.append(Row(target.name, impl.spec, case.name, dt, seconds, c.not_run(case, ref), check=c.FAULT_CHECK,
                            error=err))  # fmt: skip
            failed.setdefault(case.name, []).append(c.FAULT_CHECK)
            continue
        checks = c.compare(target, case, ref, got)
        for check, cmp in checks:
            rows.append(Row(target.name, impl.spec, case.name, dt, seconds, cmp, check=check))
            if not cmp.passed:
                failed.setdefault(case.name, []).append(check)
        if checks and checks[0][1].passed:
            passing.append(case.name)
        evidence[case.name] = c.evidence(target, case, ref, got)
    failing = failing_names(c, failed)
    if fault is not None:
        impl.reset()
        v = Verdict(target.name, impl.spec, impl.contract, False, fault.stage, fault.message, None, failing,
                    fault.traceback or fault.message, skipped=skipped)  # fmt: skip
        return on_device(rows, v, impl)
    if failed:
        d = c.diagnose(target, evidence, failed, passing, impl, ctx)
        return on_device(rows, precision(rows, Verdict(target.name, impl.spec, impl.contract, False, d.stage, d.hint,
                                                       d.matched, failing, skipped=skipped)), impl)  # fmt: skip
    if ctx.grad and c.GRAD:
        g = contracts.get(c.GRAD)
        ran = [x for x in cases if x.name not in {s["scenario"] for s in skipped}]  # a skip is not run again
        grows, gv = judge(g, target, impl, ctx, g.cases(target, ctx, impl, forward=ran))
        rows += grows
        skipped += gv.skipped
        if not gv.passed:
            gv.skipped = skipped
            return on_device(rows, precision(rows, gv), impl)
    v = precision(rows, Verdict(target.name, impl.spec, impl.contract, True, skipped=skipped))
    if v.imprecise and hasattr(c, "diagnose_precision"):
        imprecise = [r.scenario for r in rows if r.c.imprecise]
        d = c.diagnose_precision(target, evidence, imprecise, impl, ctx)
        v.stage, v.matched, v.failing = d.stage, d.matched, imprecise
        v.hint = f"passes the 1e-3 gate but is {v.precision_ratio:.0f}x less precise than transformers: {d.hint}"
    return on_device(rows, v, impl)


def unsupported(c, target, case, impl) -> str | None:
    """Why the implementation cannot take this case (the contract's `unsupported`, optional), or None."""
    return c.unsupported(target, case, impl) if hasattr(c, "unsupported") else None


def failing_names(c, failed: dict[str, list[str]]) -> list[str]:
    """The verdict's failing list: a case's name when its first check failed, `name:check` for a later one."""
    if hasattr(c, "failing_names"):
        return c.failing_names(failed)
    return [n if i == 0 and ch in (c.FAULT_CHECK, "forward") else f"{n}:{ch}"
            for n, checks in failed.items() for i, ch in enumerate(checks)]  # fmt: skip


def precision(rows: list[Row], v: Verdict) -> Verdict:
    """The verdict's precision: the largest ratio over its passing forward checks; imprecise if any check is."""
    mine = [r.c.precision_ratio for r in rows if r.impl == v.impl and r.check == "forward" and r.c.passed]
    v.precision_ratio = max([x for x in mine if x == x] or [0.0])
    v.imprecise = any(r.c.imprecise for r in rows if r.impl == v.impl)
    return v


def on_device(rows: list[Row], v: Verdict, impl: Impl) -> tuple[list[Row], Verdict]:
    for r in rows:
        r.device = str(impl.device)
    v.device, v.backend = str(impl.device), impl.backend
    return rows, v


def run(fixtures: list, impls: list[Impl], ctx: Context) -> tuple[list[Row], list[Verdict]]:
    """Every implementation on every target of its contract. Targets in order (fixtures, then each contract's own
    matrix); on each, the reference's own checks once, then the implementations in the order given."""
    plan: dict[str, tuple] = {}  # target name -> (target, [(contract, impl)])
    for impl in impls:
        c = contracts.get(impl.contract)
        for t in c.targets(fixtures):
            plan.setdefault(t.name, (t, []))[1].append((c, impl))
    rows, verdicts = ctx.rows, ctx.verdicts  # filled as it goes: a run stopped half-way still has them
    for target, jobs in plan.values():
        owner = next((c for c, _ in jobs if hasattr(c, "reference_rows")), None)  # layer and module share them
        if owner is not None:
            for r in owner.reference_rows(target, owner.cases(target, ctx, None), ctx, ctx.device):
                r.device = str(ctx.device)
                rows.append(r)
        for c, impl in jobs:
            impl.deadline = time.monotonic() + ctx.timeout
            r, v = judge(c, target, impl, ctx)
            rows += r
            verdicts.append(v)
    return rows, verdicts
