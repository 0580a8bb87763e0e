"""`attention-verify verify`: the pipeline, top to bottom.

    fixtures in -> scenarios (inputs) -> reference (HF eager in the scenario's dtype; HF in float64)
    -> each implementation on fresh copies of the same inputs (user code in its worker process)
    -> comparison (tolerance policy) -> diagnosis of a failing one -> report (table, verdict lines, JSON)

Layers (`--impl`) and modules (`--module`) run on every fixture; kernels (`--core`) on the kernel scenario matrix
(kernels.py). Also two checks of the reference itself per fixture: HF eager vs HF sdpa, and HF eager vs the
fixture's stored golden output (drift in transformers).

A fault is a verdict, never a pass: an exception is stage `crash` (its traceback in the JSON), a worker that exits
or dies is `crash` with its exit code or signal, a call past --timeout is `timeout` (the worker killed), a wrong
type, shape, dtype or device is `contract`. The run goes on with the other implementations.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harness import versions
from harness.checkpoints.format import Fixture, list_fixtures, load_fixture
from harness.checkpoints.validate import output_dir, output_path
from harness.common import Parser, UserError, compared_rows, resolve_device, update_generated, write_json
from harness.reference import Reference, Reference64
from harness.verify import grads, kernels, report
from harness.verify.compare import Comparison, compare, not_run, within
from harness.verify.diagnose import Run, diagnose, diagnose_precision
from harness.verify.plugins import CONTRACTS, GRAD_OF, LAYOUTS, Builtin, Impl, resolve
from harness.verify.scenarios import BY_NAME, Scenario, select
from harness.verify.worker import Fault
from harness.verify.worker import core_grads as worker_core_grads
from harness.verify.worker import layer_grads as worker_layer_grads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIMEOUT_S = 900.0  # per implementation and fixture (the kernel matrix counts as one fixture)
KERNELS = "kernels"  # the fixture column of kernel rows


@dataclass
class Row:
    """One (fixture, implementation, scenario, check) comparison."""

    fixture: str
    impl: str
    scenario: str
    dtype: str
    seconds: float
    c: Comparison
    check: str = "forward"  # "forward"; "lse" for a kernel's log-sum-exp; "grad_x", ... for gradients
    error: str | None = None  # why there is no output (a fault)
    device: str = "cpu"

    @property
    def passed(self) -> bool:
        return self.c.passed

    def json(self) -> dict:
        return {"fixture": self.fixture, "impl": self.impl, "scenario": self.scenario, "dtype": self.dtype,
                "check": self.check, **asdict(self.c), "error": self.error, "device": self.device,
                "seconds": self.seconds}  # fmt: skip


@dataclass
class Verdict:
    """One (fixture, implementation): passed, or the first broken stage with a hint."""

    fixture: str
    impl: str
    contract: str
    passed: bool
    stage: str | None = None
    hint: str | None = None
    matched: str | None = None
    failing: list[str] = field(default_factory=list)
    error: str | None = None  # a fault's traceback or message
    device: str = "cpu"
    backend: str | None = None  # for sdpa: the backend that actually ran
    imprecise: bool = False  # passes the gate, but some check is far less precise than transformers
    precision_ratio: float = 0.0  # the largest over its checks (1 = as precise as transformers)

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


def builtin(name: str, fn, contract: str = "layer") -> Impl:
    """Harness code under test in this process (the bug catalog, tests)."""
    return Builtin(name, contract, fn)


# ---------------------------------------------------------------------------------------------------------
# references


def weights_in(f: Fixture, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype, copy=True) for k, v in f.weights.items()}  # always a copy: never the fixture's own


def on(t, device):
    return None if t is None else t.to(device)


def reference(f: Fixture, s: Scenario, cache: dict, device: str = "cpu") -> Case:
    """Inputs, HF eager in the scenario's dtype and HF in float64 (computed on `device`, kept on the CPU), once per
    (fixture contents, scenario, device)."""
    key = (f.key, s.name, str(device))
    if key not in cache:
        x, pos, mask = s.build(f, s.dtype)
        w = {k: v.to(device) for k, v in weights_in(f, s.dtype).items()}
        ref = Reference(f.config, w, layer=f.layer, dtype=s.dtype)(x.to(device), pos.to(device), on(mask, device))
        w64 = {k: v.to(device) for k, v in f.weights.items()}
        ref64 = Reference64(f.config, w64, layer=f.layer)(x.to(device), pos.to(device), on(mask, device))
        ref, ref64 = ref.cpu(), ref64.cpu()
        keep = compared_rows(x, mask)
        if not (torch.isfinite(ref64[keep]).all() and torch.isfinite(ref[keep]).all()):
            # the judge's own answer is not a number: a fixture problem, never an implementation's fault
            raise UserError(f"{f.path}: transformers' own output is NaN/Inf on scenario {s.name} "
                            f"({str(s.dtype).removeprefix('torch.')}): the fixture's weights do not make a working "
                            "layer; re-extract it from a real checkpoint")  # fmt: skip
        cache[key] = Case(x, pos, mask, ref, ref64)
    return cache[key]


def reference_checks(f: Fixture, scenarios: list[Scenario], cache, device="cpu") -> list[Row]:
    """HF eager vs HF sdpa (a check of the reference), and HF eager vs the stored golden (drift)."""
    rows = []
    w = {k: v.to(device) for k, v in weights_in(f, torch.float32).items()}
    sdpa = Reference(f.config, w, layer=f.layer, attn_implementation="sdpa")
    for s in scenarios:
        if s.dtype != torch.float32 or s.probe:
            continue
        r = reference(f, s, cache, device)
        t0 = time.perf_counter()
        out = sdpa(r.x.to(device), r.pos.to(device), on(r.mask, device)).cpu()
        c = compare(out, r.ref, r.ref64, r.keep, s.dtype)
        rows.append(Row(f.name, "hf-sdpa", s.name, "float32", time.perf_counter() - t0, c))
    if f.inputs is not None:
        r = reference(f, BY_NAME["prompt"], cache, device)
        c = compare(f.inputs["golden"], r.ref, r.ref64, r.keep, torch.float32)
        made_with = (f.manifest.get("versions") or {}).get("transformers")
        if not c.passed and made_with == versions.installed(("transformers",))["transformers"]:
            # the same transformers gave another output at extraction: the fixture changed, not transformers
            raise UserError(f"{f.path}: the golden output stored at extraction disagrees with transformers "
                            f"{made_with}, the version that wrote it (max abs {c.max_abs_err:.2e}): the weights or "
                            "inputs were changed after extraction (and re-hashed); re-extract the fixture")  # fmt: skip
        rows.append(Row(f.name, "golden", "prompt", "float32", 0.0, c))
    return rows


# ---------------------------------------------------------------------------------------------------------
# one implementation on one fixture (layers, modules), or on the kernel matrix (cores)


def _dtype(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _fault_verdict(fixture: str, impl: Impl, fault: Fault, failing: list[str]) -> Verdict:
    return Verdict(fixture, impl.spec, impl.contract, False, fault.stage, fault.message, None, failing,
                   fault.traceback or fault.message)  # fmt: skip


def verify_layer(f: Fixture, impl: Impl, scenarios: list[Scenario], cache: dict, log, timeout: float,
                 keep: dict | None = None, grad: bool = False, quick: bool = True):  # fmt: skip
    device = impl.device
    rows, runs, failing, passing, fault = [], {}, [], [], None
    if keep is not None:
        keep[(f.name, impl.spec)] = runs  # the evidence, for the pictures
    impl.deadline = time.monotonic() + timeout
    for s in scenarios:
        r = reference(f, s, cache, device)
        t0 = time.perf_counter()
        out = err = None
        if fault is None or impl.alive:  # after an exception it answers on; after a death or a timeout, not
            try:
                out = impl.layer(f"{f.key}:{_dtype(s.dtype)}", f.config, weights_in(f, s.dtype), r.x, r.pos, r.mask)
            except Fault as e:
                fault = fault or e
                err = e.message
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a built-in that raises: the same verdict as user code
                fault = fault or Fault("crash", f"raised {type(e).__name__}: {e}")
                err = fault.message
        else:
            err = f"not run: {fault.message}"
        if out is None:
            log(f"  {f.name} {impl.spec} {s.name}: {err}")
            rows.append(Row(f.name, impl.spec, s.name, _dtype(s.dtype), time.perf_counter() - t0,
                            not_run(r.ref, s.dtype), error=err))  # fmt: skip
            failing.append(s.name)
            continue
        c = compare(out, r.ref, r.ref64, r.keep, s.dtype)
        rows.append(Row(f.name, impl.spec, s.name, _dtype(s.dtype), time.perf_counter() - t0, c))
        runs[s.name] = Run(r.x, r.pos, r.mask, out, r.ref, s.dtype, r.ref64)
        (passing if c.passed else failing).append(s.name)
    if fault is not None:
        impl.reset()
        return rows, _fault_verdict(f.name, impl, fault, failing)
    n = [0]

    def probe(x, w, pos, mask):
        n[0] += 1
        return impl.layer(f"{f.key}:probe{n[0]}", f.config, w, x, pos, mask)

    if failing:
        d = diagnose(f, runs, failing, passing, call=probe, fn=getattr(impl, "fn", None))
        return rows, _precision(rows, Verdict(f.name, impl.spec, impl.contract, False, d.stage, d.hint, d.matched,
                                              failing))  # fmt: skip
    if grad:
        names = [s.name for s in scenarios if s.name in (grads.LAYER_QUICK if quick else grads.LAYER_FULL)]
        v = layer_grads(f, impl, names, cache, rows, log)
        if v is not None:
            return rows, v
    v = _precision(rows, Verdict(f.name, impl.spec, impl.contract, True))
    if v.imprecise:
        imprecise = [r.scenario for r in rows if r.c.imprecise]
        d = diagnose_precision(f, runs, imprecise, probe)
        v.stage, v.matched, v.failing = d.stage, d.matched, imprecise
        v.hint = f"passes the 1e-3 gate but is {v.precision_ratio:.0f}x less precise than transformers: {d.hint}"
    return rows, v


def layer_grads(f: Fixture, impl: Impl, names: list[str], cache: dict, rows: list[Row], log) -> Verdict | None:
    """The backward pass on these scenarios: gradient rows appended; a failing verdict, or None when all pass."""
    runs, failing, fault, device = {}, {}, None, impl.device
    for name in names:
        s = BY_NAME[name]
        r = reference(f, s, cache, device)
        dt = _dtype(s.dtype)
        g = grads.seeded_g(r.ref.shape, r.keep, s.dtype)
        key = (f.key, s.name, "grad")
        if key not in cache:  # transformers through autograd, once per fixture contents and scenario
            w = weights_in(f, s.dtype)
            cache[key] = (grads.hf_layer_grads(f.config, w, r.x, r.pos, r.mask, g, s.dtype),
                          grads.hf_layer_grads(f.config, f.weights, r.x, r.pos, r.mask, g, s.dtype, float64=True),
                          grads.hf_layer_grads(f.config, w, r.x, r.pos, r.mask, g, s.dtype, path="sdpa"))
        ref, ref64, ref_sdpa = cache[key]
        t0 = time.perf_counter()
        try:
            got = impl.layer_grad(f"{f.key}:{dt}", f.config, weights_in(f, s.dtype), r.x, r.pos, r.mask, g)
        except Exception as e:  # noqa: BLE001 - a fault, or a built-in that raises: a verdict either way
            fault = e if isinstance(e, Fault) else Fault("crash", f"computing gradients raised {type(e).__name__}: {e}")
            log(f"  {f.name} {impl.spec} {s.name} (gradients): {fault.message}")
            rows.append(Row(f.name, impl.spec, s.name, dt, time.perf_counter() - t0, not_run(r.ref, s.dtype),
                            check="grad", error=fault.message))  # fmt: skip
            failing[s.name] = ["grad"]
            break
        gr = grads.GradRun(got, ref, ref64, s.dtype, ref_sdpa, r.keep, (r.x, r.pos, r.mask, g))
        runs[s.name] = gr
        for n in got:
            c = grads.compare_grad(n, gr)
            rows.append(Row(f.name, impl.spec, s.name, dt, time.perf_counter() - t0, c, check=f"grad_{n}"))
            if not c.passed:
                failing.setdefault(s.name, []).append(n)
    if fault is not None:
        impl.reset()
        return _fault_verdict(f.name, impl, fault, list(failing))
    if not failing:
        return None

    def suspect(bug, run: grads.GradRun):
        x, pos, mask, g = run.inputs
        w = {k: v.double() for k, v in f.weights.items()}
        out = worker_layer_grads(bug.layer(), "layer", f.config, w, x.double(), pos, mask, g.double())
        return dict(zip(GRAD_OF, out, strict=True))

    d = grads.diagnose_grads(runs, failing, "layer", f.config, suspect)
    return _precision(rows, Verdict(f.name, impl.spec, impl.contract, False, d.stage, d.hint, d.matched,
                                    [f"{n}:grad" for n in failing]))  # fmt: skip


def kernel_grads(impl: Impl, names: list[str], cache: dict, rows: list[Row], log) -> Verdict | None:
    runs, failing, fault = {}, {}, None
    for name in names:
        s = kernels.BY_NAME[name]
        c = kernels.reference(s, cache.setdefault(KERNELS, {}))
        dt = _dtype(s.dtype)
        g = grads.seeded_g(c.ref.shape, c.keep[:, None, :], s.dtype)
        mask4 = kernels.allowed(s, c.mask).expand(c.q.shape[0], 1, s.Sq, s.Sk)
        scale = s.d**-0.5 if s.scale is None else s.scale
        key = (s.name, "grad")
        kc = cache[KERNELS]
        if key not in kc:
            kc[key] = (grads.hf_kernel_grads(c.q, c.k, c.v, mask4, g, scale, s.dtype),
                       grads.hf_kernel_grads(c.q, c.k, c.v, mask4, g, scale, s.dtype, float64=True),
                       grads.hf_kernel_grads(c.q, c.k, c.v, mask4, g, scale, s.dtype, path="sdpa"))
        ref, ref64, ref_sdpa = kc[key]
        t0 = time.perf_counter()
        try:
            got = impl.core_grad(c.q, c.k, c.v, causal=s.causal, scale=s.scale, mask=c.mask, g=g)
        except Exception as e:  # noqa: BLE001 - a fault, or a built-in that raises: a verdict either way
            fault = e if isinstance(e, Fault) else Fault("crash", f"computing gradients raised {type(e).__name__}: {e}")
            log(f"  {KERNELS} {impl.spec} {s.name} (gradients): {fault.message}")
            rows.append(Row(KERNELS, impl.spec, s.name, dt, time.perf_counter() - t0, not_run(c.ref, s.dtype),
                            check="grad", error=fault.message))  # fmt: skip
            failing[s.name] = ["grad"]
            break
        gr = grads.GradRun(got, ref, ref64, s.dtype, ref_sdpa, None, (c.q, c.k, c.v, s, c.mask, g))
        runs[s.name] = gr
        for n in got:
            cmp = grads.compare_grad(n, gr)
            rows.append(Row(KERNELS, impl.spec, s.name, dt, time.perf_counter() - t0, cmp, check=f"grad_{n}"))
            if not cmp.passed:
                failing.setdefault(s.name, []).append(n)
    if fault is not None:
        impl.reset()
        return _fault_verdict(KERNELS, impl, fault, list(failing))
    if not failing:
        return None

    def suspect(bug, run: grads.GradRun):
        q, k, v, s, mask, g = run.inputs
        out = worker_core_grads(bug.kernel(), q.double(), k.double(), v.double(), s.causal, s.scale, mask,
                                g.double())  # fmt: skip
        return dict(zip(("q", "k", "v"), out, strict=True))

    d = grads.diagnose_grads(runs, failing, "core", None, suspect)
    return _precision(rows, Verdict(KERNELS, impl.spec, "core", False, d.stage, d.hint, d.matched,
                                    [f"{n}:grad" for n in failing]))  # fmt: skip


def _precision(rows: list[Row], v: Verdict) -> Verdict:
    mine = [r.c.precision_ratio for r in rows if r.impl == v.impl and r.check == "forward" and r.c.passed]
    v.precision_ratio = max([x for x in mine if x == x] or [0.0])
    v.imprecise = any(r.c.imprecise for r in rows if r.impl == v.impl)
    return v


def verify_kernel(impl: Impl, scenarios: list, cache: dict, log, timeout: float, keep: dict | None = None,
                  grad: bool = False, quick: bool = True):  # fmt: skip
    rows, runs, failing, passing, fault = [], {}, [], [], None
    if keep is not None:
        keep[(KERNELS, impl.spec)] = runs
    impl.deadline = time.monotonic() + timeout
    for s in scenarios:
        c = kernels.reference(s, cache.setdefault(KERNELS, {}))
        t0 = time.perf_counter()
        out = lse = err = None
        if fault is None or impl.alive:  # after an exception the worker answers on; after a death, nothing
            try:
                out, lse = impl.core(c.q, c.k, c.v, causal=s.causal, scale=s.scale, mask=c.mask)
            except Fault as e:
                fault, err = fault or e, e.message
            except Exception as e:  # noqa: BLE001
                fault = fault or Fault("crash", f"raised {type(e).__name__}: {e}")
                err = fault.message
        else:
            err = f"not run: {fault.message}"
        dt = time.perf_counter() - t0
        if out is None:
            log(f"  {KERNELS} {impl.spec} {s.name}: {err}")
            rows.append(Row(KERNELS, impl.spec, s.name, _dtype(s.dtype), dt, not_run(c.ref, s.dtype), error=err))
            failing.append(s.name)
            continue
        cmp = compare(kernels.rows_of(out), kernels.rows_of(c.ref), kernels.rows_of(c.ref64), c.keep, s.dtype)
        rows.append(Row(KERNELS, impl.spec, s.name, _dtype(s.dtype), dt, cmp))
        (passing if cmp.passed else failing).append(s.name)
        lse_err = None
        if lse is not None:
            lse_err = kernels.lse_error(lse, c)
            rule = "|lse-lse64|<=1e-3" if s.dtype == torch.float32 else "|lse-lse64|<=2x|HF-lse64|+1e-3"
            lc = within(lse_err, c.lse_tol, rule)
            rows.append(Row(KERNELS, impl.spec, s.name, _dtype(s.dtype), 0.0, lc, check="lse"))
            if not lc.passed:
                failing.append(s.name + ":lse")
        runs[s.name] = kernels.KernelRun(s, c, out, lse_err)
    if fault is not None:
        impl.reset()
        return rows, _fault_verdict(KERNELS, impl, fault, failing)
    if not failing and grad:
        names = [s.name for s in scenarios if s.name in (grads.KERNEL_QUICK if quick else grads.KERNEL_FULL)]
        gv = kernel_grads(impl, names, cache, rows, log)
        if gv is not None:
            return rows, gv
    if not failing:
        v = _precision(rows, Verdict(KERNELS, impl.spec, "core", True))
        if v.imprecise:
            imprecise = [r.scenario for r in rows if r.c.imprecise]
            d = kernels.diagnose_precision(runs, imprecise)
            v.stage, v.matched, v.failing = d.stage, d.matched, imprecise
            v.hint = f"passes the 1e-3 gate but is {v.precision_ratio:.0f}x less precise than transformers: {d.hint}"
        return rows, v
    d = kernels.diagnose_kernel(runs, failing, passing, impl.core)
    return rows, _precision(rows, Verdict(KERNELS, impl.spec, "core", False, d.stage, d.hint, d.matched, failing))


def _on_device(items: list, impl: Impl) -> list:
    for x in items:
        x.device = str(impl.device)
        if isinstance(x, Verdict):
            x.backend = impl.backend
    return items


def verify(fixtures: list[Fixture], impls: list, dtypes: set, quick: bool, log=print, cache: dict | None = None,
           timeout: float = TIMEOUT_S, keep: dict | None = None, grad: bool = False, device: str = "cpu",
           ) -> tuple[list[Row], list[Verdict]]:  # fmt: skip
    """impls: Impl objects (or (name, layer function) pairs for harness code, run in this process). cache:
    reference results keyed by (fixture contents, scenario), reusable across calls."""
    impls = [i if isinstance(i, Impl) else builtin(*i) for i in impls]
    rows: list[Row] = []
    verdicts: list[Verdict] = []
    cache = {} if cache is None else cache
    layers = [i for i in impls if i.contract != "core"]
    if layers:
        for f in fixtures:
            rows += reference_checks(f, select(f, dtypes, quick), cache, device)
            for impl in layers:
                scenarios = select(f, dtypes, quick, getattr(impl, "interpreted", False))
                r, v = verify_layer(f, impl, scenarios, cache, log, timeout, keep, grad, quick)
                rows += _on_device(r, impl)
                verdicts.append(_on_device([v], impl)[0])
    for impl in (i for i in impls if i.contract == "core"):
        scenarios = kernels.select(dtypes, quick, slow_kernel=getattr(impl, "interpreted", False))
        r, v = verify_kernel(impl, scenarios, cache, log, timeout, keep, grad, quick)
        rows += _on_device(r, impl)
        verdicts.append(_on_device([v], impl)[0])
    return rows, verdicts


# ---------------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    p = Parser(prog="attention-verify verify",
               description="Verify attention implementations against transformers' LlamaAttention.")  # fmt: skip
    p.many("--fixture", help="fixture names or directories (default: every fixture); repeatable")
    p.many("--impl", help="layers: built-in names or module:function (attention(x, weights, *, config, "
           "position_ids, attention_mask=None)); repeatable")  # fmt: skip
    p.many("--module", help="modules: module:factory, build(config, weights) -> layer(x, position_ids, "
           "attention_mask=None); repeatable")  # fmt: skip
    p.many("--core", help="kernels: built-in names or module:function, attn(q, k, v, *, causal=True, scale=None, "
           "attention_mask=None) -> out or (out, lse); repeatable")  # fmt: skip
    p.add_argument("--weights-layout", choices=LAYOUTS, default="hf",
                   help="q/k rows as HF stores them (half-split RoPE pairs, default) or as Meta's checkpoints do "
                   "(interleaved pairs), for --module and --impl")  # fmt: skip
    p.many("--dtype", split=True, default=list(DTYPES), help="dtypes (default: all three); repeatable, commas too")
    p.add_argument("--quick", action="store_true", help="the short scenario set")
    p.add_argument("--grad", action="store_true", help="the backward pass too: gradients of sum(out * g) w.r.t. x "
                   "and the weights (layers, modules) or q, k, v (kernels), against transformers through autograd")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, metavar="SECONDS",
                   help=f"per implementation and fixture (default {TIMEOUT_S:g}): past it, stage timeout")
    p.add_argument("--strict", action="store_true",
                   help="an imprecise implementation (passes 1e-3, far less precise than transformers) fails too")
    p.add_argument("--plot", type=Path, metavar="DIR", help="a PNG of where the error sits for every failing or "
                   "imprecise implementation and fixture")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu); the references run "
                   "there too, float64 included")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.add_argument("--doc", type=Path, help="rewrite the generated table of this page: the precision ratios "
                   "(docs/precision.md), or with --grad the gradient errors (docs/grad.md)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.json:
        output_path(a.json, "--json")  # found now, not after the whole run
    if a.plot:
        output_dir(a.plot, "--plot")
    if a.doc:
        output_path(a.doc, "--doc")
    unknown = [d for d in a.dtype if d not in DTYPES]
    if unknown:
        raise UserError(f"--dtype: unknown dtype '{unknown[0]}'; choose from {', '.join(DTYPES)}")
    if not a.timeout > 0:
        raise UserError(f"--timeout {a.timeout:g}: give a positive number of seconds")
    dtypes = {DTYPES[d] for d in a.dtype}
    device = str(resolve_device(a.device))
    from impl import CORES, IMPLEMENTATIONS

    asked = {"layer": a.impl, "module": a.module, "core": a.core}
    if not any(asked.values()):  # the default: every built-in layer and every built-in kernel
        asked = {"layer": list(IMPLEMENTATIONS), "module": [], "core": list(CORES)}
    impls = [resolve(spec, contract, layout=a.weights_layout, device=device)
             for contract in CONTRACTS for spec in dict.fromkeys(asked[contract] or [])]  # fmt: skip
    fixtures = resolve_fixtures(list(dict.fromkeys(a.fixture)) if a.fixture else None)
    torch.manual_seed(0)
    runs: dict = {}
    try:
        for i in impls:
            i.launch()  # every worker imports at once (on several cores, side by side)
        for i in impls:
            i.prepare(a.timeout)  # the user's code imported now: a bad spec stops the run before any work
        rows, verdicts = verify(fixtures, impls, dtypes, a.quick, timeout=a.timeout, keep=runs if a.plot else None,
                                grad=a.grad, device=device)  # fmt: skip
    finally:
        for i in impls:
            i.close()
    seconds = time.perf_counter() - t0
    n_layers = sum(i.contract != "core" for i in impls)
    report.print_report(rows, verdicts, seconds, len(fixtures) if n_layers else 0, len(impls), strict=a.strict)
    if a.json:
        write_json(a.json, report.document(rows, verdicts, seconds, strict=a.strict))
    if a.doc:  # with --grad: the gradient errors (docs/grad.md); else the precision ratios (docs/precision.md)
        update_generated(a.doc, report.grad_markdown(rows) if a.grad else report.precision_markdown(rows))
    if a.plot:
        from harness.verify import plot

        for path in plot.draw_all(a.plot, verdicts, runs, {f.name: f for f in fixtures}):
            print(f"wrote {path}")
    failed = any(not r.passed for r in rows) or any(not v.passed for v in verdicts)
    failed = failed or (a.strict and any(v.imprecise for v in verdicts))
    return 1 if failed else 0
