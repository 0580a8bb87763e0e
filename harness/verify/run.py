"""`attention-verify verify`: the pipeline, top to bottom.

    fixtures in -> scenarios (inputs) -> reference (HF eager in the scenario's dtype; HF in float64)
    -> each implementation on fresh copies of the same inputs (user code in its worker process)
    -> comparison (tolerance policy) -> diagnosis of a failing one -> report (table, verdict lines, JSON)

Layers (`--impl`) and modules (`--module`) run on every fixture; kernels (`--core`) on the kernel scenario matrix
(kernels.py), paged and varlen kernels (`--paged`, `--varlen`) on theirs (paged_cases.py, varlen_cases.py). With no
contract option, every built-in of every contract. Also two checks of the reference itself per fixture: HF eager vs
HF sdpa, and HF eager vs the fixture's stored golden output (drift in transformers).

A fault is a verdict, never a pass: an exception is stage `crash` (its traceback in the JSON), a worker that exits
or dies is `crash` with its exit code or signal, a call past --timeout is `timeout` (the worker killed), a wrong
type, shape, dtype or device is `contract`. The run goes on with the other implementations.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

from harness.checkpoints.format import Fixture, list_fixtures, load_fixture
from harness.checkpoints.validate import output_dir, output_path
from harness.common import (
    WEEK_S,
    Parser,
    Stopped,
    UserError,
    generated_block,
    hold_signals,
    resolve_device,
    update_generated,
    write_atomic,
    write_json,
)
from harness.verify import ci_output, contracts, drift, isolation, launched, loop, plot, report
from harness.verify.loop import Context
from harness.verify.plugins import LAYOUTS, Impl, builtin, resolve
from harness.verify.records import Row, Verdict

__all__ = ["DTYPES", "builtin", "resolve_fixtures", "verify"]  # what the mutation suite and the tests use

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIMEOUT_S = 900.0  # per implementation and fixture (the kernel matrix counts as one fixture)


def resolve_fixtures(names: list[str] | None) -> list[Fixture]:
    if names:
        return [load_fixture(n) for n in names]
    found = [load_fixture(p) for p in list_fixtures()]
    if not found:
        raise UserError("no fixtures under fixtures/; run `make synthetic` or scripts/extract.py --source smollm2")
    return found


def verify(fixtures: list[Fixture], impls: list, dtypes: set, quick: bool, log=print, cache: dict | None = None,
           timeout: float = TIMEOUT_S, keep: dict | None = None, grad: bool = False, device: str = "cpu",
           done: tuple[list, list] | None = None) -> tuple[list[Row], list[Verdict]]:  # fmt: skip
    """impls: Impl objects (or (name, layer function) pairs for harness code, run in this process). cache:
    reference results keyed by (fixture contents, scenario), reusable across calls. done: (rows, verdicts) lists
    filled as the run goes (what a stopped run has judged)."""
    impls = [i if isinstance(i, Impl) else builtin(*i) for i in impls]
    ctx = Context(dtypes, quick, grad, timeout, device, log, {} if cache is None else cache, keep)
    if done is not None:
        ctx.rows, ctx.verdicts = done
    return loop.run(fixtures, impls, ctx)


# ---------------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    p = Parser(prog="attention-verify verify",
               description="Verify attention implementations against each family's transformers attention "
               "(LlamaAttention, Qwen3Attention, Gemma3Attention, ...).")  # fmt: skip
    p.many("--fixture", help="fixture names or directories (default: every fixture); repeatable")
    named = contracts.with_options()  # one repeatable option per contract
    for c in named:
        p.many(c.OPTION, help=c.HELP + "; repeatable")
    p.add_argument("--weights-layout", choices=LAYOUTS, default="hf",
                   help="q/k rows as HF stores them (half-split RoPE pairs, default) or as Meta's checkpoints do "
                   "(interleaved pairs), for --module and --impl")  # fmt: skip
    p.many("--dtype", split=True, default=list(DTYPES), help="dtypes (default: all three); repeatable, commas too")
    p.add_argument("--quick", action="store_true", help="the short scenario set")
    p.add_argument("--grad", action="store_true", help="the backward pass too: gradients of sum(out * g) w.r.t. x "
                   "and the weights (layers, modules) or q, k, v (kernels), against transformers through autograd")
    p.number("--timeout", lo=0, hi=WEEK_S, above=True, unit="seconds", default=TIMEOUT_S, metavar="SECONDS",
             help=f"per implementation and fixture (default {TIMEOUT_S:g}): past it, stage timeout")
    p.add_argument("--strict", action="store_true",
                   help="an imprecise implementation (passes 1e-3, far less precise than transformers) fails too, and "
                   "so does one that skipped a scenario (a kernel whose signature lacks window, softcap or sinks)")
    p.add_argument("--plot", type=Path, metavar="DIR", help="a PNG of where the error sits for every failing or "
                   "imprecise implementation and fixture")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu); the references run "
                   "there too, float64 included")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--junit", type=Path, metavar="PATH", help="write the results as JUnit XML: a testcase per row "
                   "(classname fixture/impl, name scenario:check), a failure naming the stage; the reference's own "
                   "rows in the testsuite `reference`")  # fmt: skip
    p.add_argument("--accept-reference", action="store_true",
                   help="after a look at a reference drift: rewrite the drifted fixtures' golden outputs (and their "
                   "sha256 and versions in manifest.json) with the installed transformers' output")  # fmt: skip
    p.add_argument("--doc", type=Path, help="rewrite the generated table of this page: the precision ratios "
                   "(docs/precision.md), or with --grad the gradient errors (docs/grad.md)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if launched.world() is not None and launched.rank() != 0:  # under torchrun: rank 0 reports and writes
        a.json = a.junit = a.doc = a.plot = None
    if a.json:
        output_path(a.json, "--json")  # found now, not after the whole run
    if a.plot:
        output_dir(a.plot, "--plot")
    if a.doc:
        output_path(a.doc, "--doc")
        generated_block(a.doc)  # the block the run fills: there now, not found missing after the run
    if a.junit:
        output_path(a.junit, "--junit")
        ci_output.require_junitparser()
    summary = os.environ.get("GITHUB_STEP_SUMMARY") if launched.world() is None or launched.rank() == 0 else None
    if summary:
        output_path(summary, "GITHUB_STEP_SUMMARY")
    unknown = [d for d in a.dtype if d not in DTYPES]
    if unknown:
        raise UserError(f"--dtype: unknown dtype '{unknown[0]}'; choose from {', '.join(DTYPES)}")
    dtypes = {DTYPES[d] for d in a.dtype}
    device = str(resolve_device(a.device))
    asked = {c.NAME: getattr(a, c.OPTION.removeprefix("--").replace("-", "_")) or [] for c in named}
    if launched.world() is not None:  # under torchrun: the launched processes are a ring's ranks
        other = next((c.OPTION for c in named if asked[c.NAME] and c.NAME != "ring"), None)
        if other:
            raise UserError(f"under torchrun (WORLD_SIZE={launched.world()}) verify runs --ring only; run {other} "
                            "without torchrun")  # fmt: skip
        asked = {"ring": asked["ring"] or list(contracts.get("ring").builtins())}
    if not any(asked.values()):  # the default: every built-in of every contract
        asked = {c.NAME: list(c.builtins()) for c in named}
    impls = [resolve(spec, name, layout=a.weights_layout, device=device)
             for name, specs in asked.items() for spec in dict.fromkeys(specs)]  # fmt: skip
    fixtures = resolve_fixtures(list(dict.fromkeys(a.fixture)) if a.fixture else None)
    if any(not i.builtin for i in impls) and isolation.unavailable():
        print(f"note: workers run without namespaces here ({isolation.unavailable()}): the code under test can signal "
              "this run and its other workers and, run as root, open their memory (docs/isolation.md)")  # fmt: skip
    if a.accept_reference:
        drift.check_writable(fixtures)
    torch.manual_seed(0)
    with launched.rank_zero_speaks():
        return _run(a, impls, fixtures, dtypes, device, summary, t0)


def _run(a, impls: list, fixtures: list, dtypes: set, device: str, summary: str | None, t0: float) -> int:
    runs: dict = {}
    rows, verdicts = [], []
    try:
        for i in impls:
            i.launch()  # every worker imports at once (on several cores, side by side)
        for i in impls:
            i.prepare(a.timeout)  # the user's code imported now (a failure is that implementation's verdict)
        verify(fixtures, impls, dtypes, a.quick, timeout=a.timeout, keep=runs if a.plot else None, grad=a.grad,
               device=device, done=(rows, verdicts))  # fmt: skip
    except (KeyboardInterrupt, Stopped) as e:
        hold_signals()
        return stopped(a, e, rows, verdicts, time.perf_counter() - t0, len(impls))
    finally:
        for i in impls:
            i.close()  # every worker ended (and all it started), whatever ended the run
    seconds = time.perf_counter() - t0
    on_fixtures = any(contracts.get(i.contract).targets(fixtures) == fixtures for i in impls)
    n_fixtures = len(fixtures) if on_fixtures else 0
    moved = drift.found(rows, fixtures)
    report.print_report(rows, verdicts, seconds, n_fixtures, len(impls), strict=a.strict, drift=moved)
    if a.json:
        write_json(a.json, report.document(rows, verdicts, seconds, strict=a.strict, drift=moved))
    if a.junit:
        write_atomic(a.junit, ci_output.junit(rows, verdicts, strict=a.strict, drift=moved))
    if summary:
        ci_output.append_summary(summary, ci_output.step_summary(rows, verdicts, seconds, n_fixtures, len(impls),
                                                                 strict=a.strict, drift=moved))  # fmt: skip
    if ci_output.github_actions():
        for line in ci_output.annotations(rows, verdicts, strict=a.strict, drift=moved):
            print(line)
    if a.doc:  # with --grad: the gradient errors (docs/grad.md); else the precision ratios (docs/precision.md)
        update_generated(a.doc, report.grad_markdown(rows) if a.grad else report.precision_markdown(rows))
    if a.plot:
        for path in plot.draw_all(a.plot, verdicts, runs, {f.name: f for f in fixtures}):
            print(f"wrote {path}")
    if a.accept_reference:
        if not drift.accept(fixtures, moved):
            print("--accept-reference: no reference drift, nothing to rewrite")
    # a drift is never a failure: implementations are judged against the installed transformers; a skip is one
    # only under --strict
    failed = any(not r.passed and not report.is_drift(r) and r.skipped is None for r in rows)
    failed = failed or any(not v.passed for v in verdicts)
    failed = failed or (a.strict and any(v.imprecise or v.skipped for v in verdicts))  # a skip is never a pass
    return 1 if failed else 0


def stopped(a, e: BaseException, rows: list, verdicts: list, seconds: float, n_impls: int) -> int:
    """Ctrl-C, SIGTERM or SIGHUP during the run: the workers are ended (by the caller's `finally`), one line says
    so, and --json/--junit get what was judged until then, marked as stopped. Exit code 128 + the signal."""
    signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
    name = signal.Signals(signum).name
    wrote = []
    if a.json:
        write_json(a.json, report.document(rows, verdicts, seconds, strict=a.strict) | {"stopped": name})
        wrote.append(str(a.json))
    if a.junit:
        write_atomic(a.junit, ci_output.junit(rows, verdicts, strict=a.strict))
        wrote.append(str(a.junit))
    print(f"error: stopped by {name} after {seconds:.0f} s, {len(verdicts)} verdict(s) given ({n_impls} "
          "implementation(s) asked); workers ended" + (f"; wrote {', '.join(wrote)}" if wrote else ""),
          file=sys.stderr)  # fmt: skip
    return 128 + signum
