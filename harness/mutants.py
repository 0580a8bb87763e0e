"""`attention-verify mutants`: the mutation suite. The harness, exactly as `verify` runs it, on every bug of the
catalog: a bug is caught when some check fails, and diagnosed when the verdict names its stage.

    catalog (harness/bugs/catalog.py) -> each bug as a plug-in -> verify on the first fixture (every scenario,
    every dtype) -> what escaped, on the next fixture (escalation) -> scores: caught, stage right; held-out bugs apart

The held-out bugs are never seen by the diagnosis, so their stage accuracy is what the diagnosis does on bugs it
was not written for. The gate (exit 1; CI runs it) is: every bug caught, held out or not, and at least
MIN_TUNED_STAGE of the tuned bugs' stages named right; the held-out accuracy is reported, never gated or tuned to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from harness.bugs.catalog import BY_NAME, CATALOG, Bug
from harness.checkpoints.validate import output_path
from harness.common import Parser, UserError, generated_block, update_generated, write_json
from harness.verify.run import DTYPES, builtin, resolve_fixtures, verify

MIN_TUNED_STAGE = 0.9  # of the tuned bugs, the share whose stage the verdict must name

# Real weights first (fast, GQA 9/3), then Llama-3.2-1B's exact config (llama3 RoPE scaling, 32/8 heads), then the
# small Llama-shaped configs with linear, dynamic and yarn scaling (what only a scaled rope type can show), then the
# families (a bug of a family's field waits for the first fixture that has the field: Bug.shows).
DEFAULT_FIXTURES = ["smollm2-135m", "llama-3.2-1b-synthetic", "rope-linear-synthetic", "rope-dynamic-synthetic",
                    "rope-yarn-synthetic", "qwen3-synthetic", "qwen2-synthetic", "gemma2-synthetic",
                    "gpt-oss-synthetic", "phi3-synthetic", "gemma3-270m", "gemma3-270m-global"]  # fmt: skip


@dataclass
class Result:
    mutant: str
    caught: bool
    stage: str | None  # the stage the harness named (None when not caught)
    expected: str
    held_out: bool
    caught_by: list[str]  # fixture/scenario checks that failed
    hint: str | None = None

    @property
    def diagnosed(self) -> bool:
        return self.caught and self.stage == self.expected


def run_mutants(fixtures, bugs: list[Bug] = CATALOG, log=print, cache=None) -> list[Result]:
    """Verify every layer bug (all scenarios, all dtypes) on the first fixture, then the ones not yet caught on the
    next (the big Llama-shaped fixture is only needed for what the small real one cannot show); every kernel bug on
    the kernel matrix. A bug's stage is the verdict of the fixture that caught it."""
    found: dict[str, Result] = {}
    cache = {} if cache is None else cache
    for kind in ("forward", "backward"):  # backward bugs are verified with their gradients (verify --grad)
        grad = kind == "backward"
        for contract in ("core", "paged", "varlen", "ring"):  # the kernel contracts: their own matrices, no fixture
            cores = [b for b in bugs if b.contract == contract and b.kind == kind]
            if not cores:
                continue
            t0 = time.perf_counter()
            rows, verdicts = verify([], [builtin(b.name, b.kernel(), contract) for b in cores], set(DTYPES.values()),
                                    quick=False, log=lambda *_: None, cache=cache, grad=grad)  # fmt: skip
            _record(found, cores, rows, verdicts)
            what = {"core": "kernels", "paged": "paged kernels", "varlen": "varlen kernels",
                    "ring": "ring kernels"}[contract]  # fmt: skip
            log(f"  {what}{' (gradients)' * grad}: {len(cores)} mutants verified, "
                f"{sum(b.name in found for b in cores)} caught, {time.perf_counter() - t0:.0f} s")  # fmt: skip
        for f in fixtures:
            todo = [b for b in bugs if b.name not in found and b.contract == "layer" and b.kind == kind
                    and b.shows(f.layer_config)]  # a bug that cannot show on this fixture waits for one where it can
            if not todo:
                if not any(b.name not in found and b.contract == "layer" and b.kind == kind for b in bugs):
                    break
                continue  # what is left cannot show here: a later fixture has its field
            t0 = time.perf_counter()
            rows, verdicts = verify([f], [(b.name, b.layer()) for b in todo], set(DTYPES.values()), quick=False,
                                    log=lambda *_: None, cache=cache, grad=grad)  # fmt: skip
            _record(found, todo, rows, verdicts)
            log(f"  {f.name}{' (gradients)' * grad}: {len(todo)} mutants verified, "
                f"{sum(b.name in found for b in todo)} caught, {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return [found.get(b.name) or Result(b.name, False, None, b.stage, b.held_out, []) for b in bugs]


def _record(found: dict, bugs: list[Bug], rows, verdicts) -> None:
    by_name = {b.name: b for b in bugs}
    for v in verdicts:
        if not v.passed:
            b = by_name[v.impl]
            failed = sorted({f"{r.fixture}/{r.scenario}" for r in rows if r.impl == b.name and not r.passed
                             and r.skipped is None})  # a skipped scenario (a keyword it lacks) did not fail
            found[b.name] = Result(b.name, True, v.stage, b.stage, b.held_out, failed, v.hint)


def scores(results: list[Result]) -> dict:
    tuned = [r for r in results if not r.held_out]
    held = [r for r in results if r.held_out]
    return {
        "total": len(results),
        "caught": sum(r.caught for r in results),
        "diagnosed": sum(r.diagnosed for r in results),
        "tuned": len(tuned),
        "diagnosed_tuned": sum(r.diagnosed for r in tuned),
        "held_out": len(held),
        "caught_held_out": sum(r.caught for r in held),
        "diagnosed_held_out": sum(r.diagnosed for r in held),
    }


def report(results: list[Result], log=print) -> None:
    """The table and the scores, tuned and held out apart."""
    w = max(len(r.mutant) for r in results)
    log(f"{'mutant':{w}s}  held-out  caught  {'stage named':17s} {'expected':17s}  caught by (failing checks)")
    for r in results:
        named = r.stage or "-"
        mark = "ok" if r.diagnosed else ("WRONG" if r.caught else "")
        by = ", ".join(sorted({b.split("/", 1)[1] for b in r.caught_by}))
        log(f"{r.mutant:{w}s}  {'yes' if r.held_out else '':8s}  {'yes' if r.caught else 'NO':6s}  {named:17s} "
            f"{r.expected:17s}  {mark:5s} {by}")  # fmt: skip
    s = scores(results)

    def pct(a, b):
        return f"{a}/{b} ({100 * a / b:.0f}%)" if b else "0/0"

    log(f"\ncaught {pct(s['caught'], s['total'])}, stage right {pct(s['diagnosed'], s['total'])}")
    log(f"  tuned (the diagnosis knows them): stage right {pct(s['diagnosed_tuned'], s['tuned'])}")
    log(f"  held out (never seen by the diagnosis): caught {pct(s['caught_held_out'], s['held_out'])}, "
        f"stage right {pct(s['diagnosed_held_out'], s['held_out'])}")  # fmt: skip


def markdown(results: list[Result], seconds: float, fixtures: list[str]) -> str:
    """The table of a run for docs/mutants.md."""
    s = scores(results)
    lines = [
        f"**Caught {s['caught']}/{s['total']}; stage right: tuned {s['diagnosed_tuned']}/{s['tuned']}, held out "
        f"{s['diagnosed_held_out']}/{s['held_out']}** ({', '.join(fixtures)}; {seconds:.0f} s on this machine)",
        "",
        "| bug | held out | the mistake | expected stage | stage named | caught by (failing checks) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        by = sorted({b.split("/", 1)[1] for b in r.caught_by})
        where = ", ".join(by) if len(by) <= 4 else f"{len(by)} scenarios"
        fx = sorted({b.split("/", 1)[0] for b in r.caught_by})
        where += f" ({fx[0]})" if fx and fx[0] != DEFAULT_FIXTURES[0] else ""
        named = r.stage if r.diagnosed else f"**{r.stage or 'NOT CAUGHT'}**"
        lines.append(f"| `{r.mutant}` | {'yes' if r.held_out else ''} | {BY_NAME[r.mutant].bug} | {r.expected} | "
                     f"{named} | {where} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = Parser(prog="attention-verify mutants", description="Score the harness on the catalog of attention bugs.")
    p.many("--fixture", help="fixture names or paths (repeatable; default: smollm2-135m, llama-3.2-1b-synthetic)")
    p.many("--mutant", help="run only these bugs of the catalog (repeatable; default: all)")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--doc", help="rewrite the generated table of this docs page (docs/mutants.md)")
    a = p.parse_args(argv)
    for path, option in ((a.json, "--json"), (a.doc, "--doc")):
        if path:
            output_path(path, option)
    if a.doc:
        generated_block(a.doc)  # the block the run fills: there now, not found missing after the run
    unknown = [n for n in a.mutant or [] if n not in BY_NAME]
    if unknown:
        raise UserError(f"unknown mutant '{unknown[0]}'; see the catalog in harness/bugs/catalog.py")
    bugs = [BY_NAME[n] for n in dict.fromkeys(a.mutant)] if a.mutant else CATALOG
    fixtures = resolve_fixtures(list(dict.fromkeys(a.fixture or DEFAULT_FIXTURES)))
    t0 = time.perf_counter()
    results = run_mutants(fixtures, bugs)
    report(results)
    seconds = time.perf_counter() - t0
    print(f"{len(bugs)} mutants, fixtures {', '.join(f.name for f in fixtures)}: {seconds:.0f} s")
    if a.json:
        rows = [{"mutant": r.mutant, "held_out": r.held_out, "caught": r.caught, "stage": r.stage,
                 "expected": r.expected, "bug": BY_NAME[r.mutant].bug, "caught_by": r.caught_by, "hint": r.hint}
                for r in results]  # fmt: skip
        write_json(a.json, {**scores(results), "rows": rows, "seconds": round(seconds, 1)})
    if a.doc:
        update_generated(a.doc, markdown(results, seconds, [f.name for f in fixtures]))
    s = scores(results)
    escaped = [r.mutant for r in results if not r.caught]
    misnamed = s["diagnosed_tuned"] < MIN_TUNED_STAGE * s["tuned"]
    if escaped:
        print(f"GATE FAILED: {len(escaped)} bug(s) pass the harness: {', '.join(escaped)}")
    if misnamed:
        print(f"GATE FAILED: stage right on {s['diagnosed_tuned']}/{s['tuned']} tuned bugs, below "
              f"{MIN_TUNED_STAGE:.0%}")  # fmt: skip
    return 1 if escaped or misnamed else 0
