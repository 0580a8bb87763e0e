"""`attention-verify verify`: the pipeline, top to bottom.

    fixtures in -> scenarios (inputs) -> reference (HF eager in the scenario's dtype; HF in float64)
    -> each implementation on the same inputs -> comparison (tolerance policy) -> diagnosis of a failing one
    -> report (table, verdict lines, JSON)

Also two checks of the reference itself per fixture: HF eager vs HF sdpa, and HF eager vs the fixture's stored
golden output (drift in transformers).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harness.common import Parser, UserError, compared_rows, write_json
from harness.fixtures.format import Fixture, list_fixtures, load_fixture
from harness.verify import report
from harness.verify.compare import Comparison, compare
from harness.verify.diagnose import Run, diagnose
from harness.verify.plugins import check_output, resolve_impl
from harness.verify.reference import Reference, Reference64
from harness.verify.scenarios import BY_NAME, Scenario, select

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    """One (fixture, implementation, scenario) comparison."""

    fixture: str
    impl: str
    scenario: str
    dtype: str
    seconds: float
    c: Comparison

    @property
    def passed(self) -> bool:
        return self.c.passed

    def json(self) -> dict:
        return {"fixture": self.fixture, "impl": self.impl, "scenario": self.scenario, "dtype": self.dtype,
                **asdict(self.c), "seconds": self.seconds}  # fmt: skip


@dataclass
class Verdict:
    """One (fixture, implementation): passed, or the first broken stage with a hint."""

    fixture: str
    impl: str
    passed: bool
    stage: str | None = None
    hint: str | None = None
    matched: str | None = None
    failing: list[str] = field(default_factory=list)

    def json(self) -> dict:
        return asdict(self)


@dataclass
class Case:
    """A scenario's inputs and the references for them (computed once per fixture contents and scenario)."""

    x: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor | None
    ref: torch.Tensor  # HF eager, the scenario's dtype
    ref64: torch.Tensor  # HF in float64 with float64 RoPE tables

    @property
    def keep(self) -> torch.Tensor:
        return compared_rows(self.x, self.mask)


def resolve_fixtures(names: list[str] | None) -> list[Fixture]:
    if names:
        return [load_fixture(n) for n in names]
    found = [load_fixture(p) for p in list_fixtures()]
    if not found:
        raise UserError("no fixtures under fixtures/; run `make synthetic` or scripts/extract.py --source smollm2")
    return found


# ---------------------------------------------------------------------------------------------------------
# the pipeline


def weights_in(f: Fixture, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype, copy=True) for k, v in f.weights.items()}  # always a copy: never the fixture's own


def reference(f: Fixture, s: Scenario, cache: dict) -> Case:
    """Inputs, HF eager in the scenario's dtype and HF in float64, once per (fixture contents, scenario)."""
    key = (f.key, s.name)
    if key not in cache:
        x, pos, mask = s.build(f, s.dtype)
        ref = Reference(f.config, weights_in(f, s.dtype), layer=f.layer, dtype=s.dtype)(x, pos, mask)
        ref64 = Reference64(f.config, f.weights, layer=f.layer)(x, pos, mask)
        cache[key] = Case(x, pos, mask, ref, ref64)
    return cache[key]


def call_layer(fn, f: Fixture, x, pos, mask, weights=None) -> torch.Tensor:
    """The implementation on fresh copies of the inputs: nothing it does to them reaches the references or the
    next implementation."""
    w = weights_in(f, x.dtype) if weights is None else {k: v.clone() for k, v in weights.items()}
    m = None if mask is None else mask.clone()
    with torch.no_grad():
        out = fn(x.clone(), w, config=f.config, position_ids=pos.clone(), attention_mask=m)
    check_output(out, x)
    return out.to(x.dtype)


def reference_checks(f: Fixture, scenarios: list[Scenario], cache) -> list[Row]:
    """HF eager vs HF sdpa (a check of the reference), and HF eager vs the stored golden (drift)."""
    rows = []
    for s in scenarios:
        if s.dtype != torch.float32 or s.probe:
            continue
        r = reference(f, s, cache)
        t0 = time.perf_counter()
        out = Reference(f.config, weights_in(f, s.dtype), layer=f.layer, attn_implementation="sdpa")(r.x, r.pos, r.mask)
        c = compare(out, r.ref, r.ref64, r.keep, s.dtype)
        rows.append(Row(f.name, "hf-sdpa", s.name, "float32", time.perf_counter() - t0, c))
    if f.inputs is not None:
        r = reference(f, BY_NAME["prompt"], cache)
        c = compare(f.inputs["golden"], r.ref, r.ref64, r.keep, torch.float32)
        rows.append(Row(f.name, "golden", "prompt", "float32", 0.0, c))
    return rows


def verify(fixtures: list[Fixture], impls: list[tuple[str, object]], dtypes: set, quick: bool, log=print,
           cache: dict | None = None) -> tuple[list[Row], list[Verdict]]:  # fmt: skip
    """cache: reference results keyed by (fixture contents, scenario), reusable across calls on the same fixtures."""
    rows: list[Row] = []
    verdicts: list[Verdict] = []
    cache = {} if cache is None else cache
    for f in fixtures:
        scenarios = select(f, dtypes, quick)
        rows += reference_checks(f, scenarios, cache)
        for name, fn in impls:
            runs, failing, passing = {}, [], []
            for s in scenarios:
                r = reference(f, s, cache)
                t0 = time.perf_counter()
                try:
                    out = call_layer(fn, f, r.x, r.pos, r.mask)
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001 - a crash is a failure with a reason, not a traceback
                    log(f"  {f.name} {name} {s.name}: raised {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    out = torch.full_like(r.ref, float("nan"))
                c = compare(out, r.ref, r.ref64, r.keep, s.dtype)
                dtype = str(s.dtype).removeprefix("torch.")
                rows.append(Row(f.name, name, s.name, dtype, time.perf_counter() - t0, c))
                runs[s.name] = Run(r.x, r.pos, r.mask, out, r.ref, s.dtype)
                (passing if c.passed else failing).append(s.name)
            if failing:
                probe = lambda x, w, pos, mask, fn=fn, f=f: call_layer(fn, f, x, pos, mask, weights=w)  # noqa: E731
                d = diagnose(f, runs, failing, passing, call=probe, fn=fn)
                verdicts.append(Verdict(f.name, name, False, d.stage, d.hint, d.matched, failing))
            else:
                verdicts.append(Verdict(f.name, name, True))
    return rows, verdicts


# ---------------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    p = Parser(prog="attention-verify verify",
               description="Verify attention implementations against transformers' LlamaAttention.")  # fmt: skip
    p.many("--fixture", help="fixture names or directories (default: every fixture); repeatable")
    p.many("--impl", help="built-in names or module:function (default: every built-in); repeatable")
    p.many("--dtype", split=True, default=list(DTYPES), help="dtypes (default: all three); repeatable, commas too")
    p.add_argument("--quick", action="store_true", help="the short scenario set")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    unknown = [d for d in a.dtype if d not in DTYPES]
    if unknown:
        raise UserError(f"--dtype: unknown dtype '{unknown[0]}'; choose from {', '.join(DTYPES)}")
    dtypes = {DTYPES[d] for d in a.dtype}
    from impl import IMPLEMENTATIONS

    impls = [resolve_impl(s) for s in dict.fromkeys(a.impl or list(IMPLEMENTATIONS))]
    fixtures = resolve_fixtures(list(dict.fromkeys(a.fixture)) if a.fixture else None)
    torch.manual_seed(0)
    rows, verdicts = verify(fixtures, impls, dtypes, a.quick)
    seconds = time.perf_counter() - t0
    report.print_report(rows, verdicts, seconds, len(fixtures), len(impls))
    if a.json:
        write_json(a.json, report.document(rows, verdicts, seconds))
    return 0 if all(r.passed for r in rows) else 1
