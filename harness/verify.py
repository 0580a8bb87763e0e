"""`python -m harness verify`: the pipeline, top to bottom.

    fixture in -> scenarios (inputs) -> reference (HF eager, same dtype; HF in float64) -> implementation
    -> comparison (tolerance policy) -> diagnosis (failing pairs) -> report out (table, verdicts, JSON)

Also two checks of the reference itself per fixture: HF eager vs HF sdpa, and HF eager vs the fixture's stored
golden output (drift in transformers).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness.compare import compare
from harness.diagnose import diagnose
from harness.errors import Parser, UserError
from harness.fixture import Fixture, list_fixtures, load_fixture
from harness.output import write_json
from harness.reference import Reference, Reference64
from harness.scenarios import SCENARIOS, select

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE_CHECKS = ("hf-sdpa", "golden")


@dataclass
class Row:
    fixture: str
    impl: str
    scenario: str
    dtype: str
    passed: bool
    max_abs_err: float
    tolerance: float
    rule: str
    where: list[int] | None
    rmse: float
    max_rel_err: float
    err_vs_ref64: float
    hf_err_vs_ref64: float
    nonfinite: int
    seconds: float


# ---------------------------------------------------------------------------------------------------------
# implementations: built-in names or module:function


def resolve_impl(spec: str):
    from impl import IMPLEMENTATIONS

    if spec in IMPLEMENTATIONS:
        return spec, IMPLEMENTATIONS[spec]
    if ":" not in spec:
        raise UserError(
            f"unknown implementation '{spec}'; built-ins: {', '.join(IMPLEMENTATIONS)}, "
            "or give package.module:function (or path/to/file.py:function)"
        )
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UserError(f"{mod_name}: no such file; give path/to/file.py:function")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is bad input here
        raise UserError(
            f"cannot import '{mod_name}' ({type(e).__name__}: {str(e).splitlines()[0][:150]}); "
            "check the module path and that it imports on its own"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"'{mod_name}' has no callable '{fn_name}'; give module:function following the contract")
    return spec, fn


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
    return {k: v.to(dtype) for k, v in f.weights.items()}


def run_reference(f: Fixture, scenario, cache: dict):
    """Inputs, HF eager in the scenario's dtype and HF in float64, computed once per (fixture, scenario)."""
    key = (f.name, scenario.name)
    if key not in cache:
        x, pos, mask = scenario.build(f, scenario.dtype)
        ref = Reference(f.config, weights_in(f, scenario.dtype), layer=f.layer, dtype=scenario.dtype)(x, pos, mask)
        ref64 = Reference64(f.config, f.weights, layer=f.layer)(x, pos, mask)
        keep = mask.bool() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
        cache[key] = (x, pos, mask, ref, ref64, keep)
    return cache[key]


def run_impl(fn, f: Fixture, x, pos, mask, dtype):
    with torch.no_grad():
        out = fn(x, weights_in(f, dtype), config=f.config, position_ids=pos, attention_mask=mask)
    if not torch.is_tensor(out) or out.shape != x.shape:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(
            f"the implementation returned {got}, expected a tensor of shape {tuple(x.shape)} (see the plug-in contract)"
        )
    return out.to(dtype)


def reference_checks(f: Fixture, scenarios, cache) -> list[Row]:
    """HF eager vs HF sdpa (a check of the reference), and HF eager vs the stored golden (drift)."""
    rows = []
    for s in scenarios:
        if s.dtype != torch.float32 or s.probe:
            continue
        x, pos, mask, ref, ref64, keep = run_reference(f, s, cache)
        t0 = time.perf_counter()
        out = Reference(f.config, weights_in(f, s.dtype), layer=f.layer, attn_implementation="sdpa")(x, pos, mask)
        c = compare(out, ref, ref64, keep, s.dtype)
        rows.append(Row(f.name, "hf-sdpa", s.name, "float32", seconds=time.perf_counter() - t0, **_fields(c)))
    if f.inputs is not None:
        _, _, _, ref, ref64, keep = run_reference(f, next(s for s in SCENARIOS if s.name == "prompt"), cache)
        c = compare(f.inputs["golden"], ref, ref64, keep, torch.float32)
        rows.append(Row(f.name, "golden", "prompt", "float32", seconds=0.0, **_fields(c)))
    return rows


def _fields(c) -> dict:
    d = asdict(c)
    return {
        k: d[k]
        for k in (
            "passed",
            "max_abs_err",
            "tolerance",
            "rule",
            "where",
            "rmse",
            "max_rel_err",
            "err_vs_ref64",
            "hf_err_vs_ref64",
            "nonfinite",
        )
    }


def verify(
    fixtures: list[Fixture],
    impls: list[tuple[str, object]],
    dtypes: set,
    quick: bool,
    log=print,
    cache: dict | None = None,
):
    """cache: reference results keyed by (fixture, scenario), reusable across calls on the same fixtures."""
    rows: list[Row] = []
    verdicts = []
    cache = {} if cache is None else cache
    for f in fixtures:
        scenarios = select(f, dtypes, quick)
        rows += reference_checks(f, scenarios, cache)
        for name, fn in impls:
            runs, failing, passing = {}, [], []
            for s in scenarios:
                x, pos, mask, ref, ref64, keep = run_reference(f, s, cache)
                t0 = time.perf_counter()
                try:
                    out = run_impl(fn, f, x, pos, mask, s.dtype)
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001 - a crash is a failure with a reason, not a traceback
                    log(f"  {f.name} {name} {s.name}: raised {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    out = torch.full_like(ref, float("nan"))
                c = compare(out, ref, ref64, keep, s.dtype)
                rows.append(
                    Row(
                        f.name,
                        name,
                        s.name,
                        str(s.dtype).removeprefix("torch."),
                        seconds=time.perf_counter() - t0,
                        **_fields(c),
                    )
                )
                runs[s.name] = (x, pos, mask, out, ref, s.dtype)
                (passing if c.passed else failing).append(s.name)
            if failing:
                v = diagnose(f, fn, failing, passing, runs)
                verdicts.append(
                    {
                        "fixture": f.name,
                        "impl": name,
                        "passed": False,
                        "stage": v.stage,
                        "hint": v.hint,
                        "matched": v.matched,
                        "failing": failing,
                    }
                )
            else:
                verdicts.append({"fixture": f.name, "impl": name, "passed": True, "stage": None, "hint": None})
    return rows, verdicts


# ---------------------------------------------------------------------------------------------------------
# report


def table(rows: list[Row]) -> str:
    wf = max([7] + [len(r.fixture) for r in rows])
    wi = max([4] + [len(r.impl) for r in rows])
    head = (
        f"{'fixture':{wf}s} {'impl':{wi}s} {'scenario':17s} {'dtype':8s} {'max abs err':>11s} {'vs fp64':>9s} "
        f"{'tolerance':>9s}  result"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        res = "PASS" if r.passed else ("FAIL (NaN/Inf)" if r.nonfinite else "FAIL")
        lines.append(
            f"{r.fixture:{wf}s} {r.impl:{wi}s} {r.scenario:17s} {r.dtype:8s} {r.max_abs_err:11.2e} "
            f"{r.err_vs_ref64:9.2e} {r.tolerance:9.2e}  {res}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = Parser(
        prog="python -m harness verify",
        description="Verify attention implementations against transformers' LlamaAttention.",
    )
    p.add_argument("--fixture", nargs="+", help="fixture names or directories (default: every fixture)")
    p.add_argument("--impl", nargs="+", help="built-in names or module:function (default: every built-in)")
    p.add_argument("--dtype", default="float32,bfloat16,float16", help="comma-separated dtypes")
    p.add_argument("--quick", action="store_true", help="the short scenario set")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    dtypes = set()
    for name in a.dtype.split(","):
        if name.strip() not in DTYPES:
            raise UserError(f"--dtype: unknown dtype '{name}'; choose from {', '.join(DTYPES)}")
        dtypes.add(DTYPES[name.strip()])
    from impl import IMPLEMENTATIONS

    impls = [resolve_impl(s) for s in (a.impl or list(IMPLEMENTATIONS))]
    fixtures = resolve_fixtures(a.fixture)
    torch.manual_seed(0)
    rows, verdicts = verify(fixtures, impls, dtypes, a.quick)
    seconds = time.perf_counter() - t0
    print(table(rows))
    failed_rows = [r for r in rows if not r.passed]
    for v in verdicts:
        if not v["passed"]:
            print(
                f"FAIL {v['fixture']} / {v['impl']}: stage {v['stage']}: {v['hint']} "
                f"(failing: {', '.join(v['failing'])})"
            )
    for r in failed_rows:
        if r.impl in REFERENCE_CHECKS:
            print(
                f"REFERENCE {r.fixture} / {r.impl} / {r.scenario}: the reference itself disagrees "
                f"(max abs {r.max_abs_err:.2e}); check the transformers version against the fixture's manifest"
            )
    n_pass = sum(r.passed for r in rows)
    print(
        f"{n_pass} passed, {len(rows) - n_pass} failed in {seconds:.1f} s "
        f"({len(fixtures)} fixtures x {len(impls)} implementations)"
    )
    if a.json:
        doc = {
            "summary": {"passed": n_pass, "failed": len(rows) - n_pass, "seconds": round(seconds, 3)},
            "results": [asdict(r) for r in rows],
            "verdicts": verdicts,
        }
        write_json(a.json, doc)
    return 0 if not failed_rows else 1
