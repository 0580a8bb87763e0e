"""The pytest plugin (entry point `pytest11`): the implementations a repository names, verified as test items.

    [tool.pytest.ini_options]                       # or --attention-impl / --attention-module / --attention-core
    attention_verify = ["impl=attn.py:attention"]   # impl= layer, module= module, core= kernel (verify's contracts)
    attention_verify_quick = true                   # or --attention-quick; --attention-fixture, --attention-dtype

`pytest` then collects one item per (fixture, implementation, scenario, check) under one node,
`attention-verify::<fixture>::<spec>::<scenario>::<check>`: `-k` selects them, and a node id (or a prefix of one,
`attention-verify` for all) given as an argument runs just those. Collection runs nothing: the scenarios come from the
contracts. Running: the first item of an implementation runs `verify()` on it, the command line's judge (its worker
process, its tolerance policy), and the result is kept for the session; each item passes or fails from its row. A
failing item's message is the verdict: stage, hint, the check's error and tolerance, the failing rows, a fault's
text. An item without a row fails (the run never produced it); the skips are a kernel's `lse` check when the
kernel returned no lse (the core contract makes it optional), and a kernel's scenario that uses a keyword its
signature lacks (window, softcap, sinks: verify skips it too). Items record max_abs_err, tolerance,
precision_ratio and stage as properties (`--junitxml` carries them).

Where the items are collected: ini entries belong to the repository root (the ini file's folder): a run over it
(plain `pytest` at the root or with the ini's testpaths, `pytest .`) collects them; `pytest tests/`, or pytest started
in a subfolder, does not. Specs given as options are always collected. A relative path in an ini entry starts at the
ini file's folder; in an option, at the current one.

The plugin is loaded in every pytest run of an environment that has the package: without an implementation named it
does nothing and imports nothing of the harness (torch, transformers) at all.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NAME = "attention-verify"  # the root node; its id is the first part of every item's
# entry key / option suffix -> contract (verify's)
KINDS = {"impl": "layer", "module": "module", "core": "core", "paged": "paged", "varlen": "varlen", "ring": "ring"}
KERNELS = ("core", "paged", "varlen", "ring")  # the contracts whose code returns out or (out, lse)
CHECKS = {c: ("forward", "lse") for c in KERNELS}  # per contract, the checks of a case (default: forward only)
WEEK_S = 7 * 24 * 3600  # the longest --attention-timeout, as verify's (harness.common.WEEK_S; not imported: torch)
OPTIONAL = {(c, "lse") for c in KERNELS}  # checks the code may decline to give (a kernel that returns out only)
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # run.DTYPES, named without importing torch


@dataclass(frozen=True)
class Wanted:
    """An implementation the user named: under which contract, and where a relative path in it starts."""

    key: str  # impl | module | core
    spec: str
    base: Path  # the folder relative paths start from (the ini file's, or the invocation folder)
    origin: Path | None = None  # the ini file it is named in, or None for an option

    @property
    def contract(self) -> str:
        return KINDS[self.key]


@dataclass
class Settings:
    wanted: list[Wanted]
    fixtures: list[str]
    dtypes: list[str]
    quick: bool
    device: str | None
    timeout: float | None
    picks: list[str] = field(default_factory=list)  # node ids (or prefixes) given as arguments
    active: bool = False


SETTINGS = pytest.StashKey[Settings]()
RUNS = pytest.StashKey["Runs"]()


# ---------------------------------------------------------------------------------------------------------
# options


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("attention-verify", "attention implementations verified against transformers")
    for key, contract in KINDS.items():
        g.addoption(f"--attention-{key}", action="append", default=[], metavar="SPEC",
                    help=f"verify SPEC under the {contract} contract (as `attention-verify verify --{key}`); "
                    "repeatable; replaces the ini option attention_verify")  # fmt: skip
    g.addoption("--attention-fixture", action="append", default=[], metavar="NAME",
                help="fixture names or directories (default: every fixture the contract targets); repeatable")
    g.addoption("--attention-dtype", action="append", default=[], metavar="DTYPE",
                help=f"{', '.join(DTYPE_NAMES)} (default: all three); repeatable, commas too")
    g.addoption("--attention-quick", action="store_true", default=False,
                help="the short scenario set (ini: attention_verify_quick)")
    g.addoption("--attention-device", metavar="DEVICE",
                help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.addoption("--attention-timeout", type=float, metavar="SECONDS",
                help="per implementation and fixture (default: verify's); above 0 and at most 604800")
    parser.addini("attention_verify", type="linelist", default=[],
                  help="implementations to verify, one a line: impl=SPEC, module=SPEC or core=SPEC")
    parser.addini("attention_verify_quick", type="bool", default=False,
                  help="attention-verify: the short scenario set")


def parse_entry(text: str) -> tuple[str, str]:
    """`impl=my_attn.py:attention` -> ("impl", "my_attn.py:attention"); ValueError naming the fix."""
    key, eq, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not eq or key not in KINDS or not spec:
        raise ValueError(f"attention_verify: '{text}': give {', '.join(f'{k}=SPEC' for k in KINDS)}")
    return key, spec


def is_pick(arg: str) -> bool:
    return arg == NAME or arg.startswith(NAME + "::")


def covers(args: list[str], invocation: Path, root: Path) -> bool:
    """Does a run over these path arguments cover the folder `root` (no paths at all, or one that holds it)?"""
    if not args:
        return True
    root = root.resolve()
    for arg in args:
        path = (invocation / arg.split("::")[0]).resolve()
        if path.is_dir() and (root == path or path in root.parents):
            return True
    return False


def read_settings(config: pytest.Config) -> Settings:
    """The options and the ini, checked (UsageError for bad ones); nothing of the harness imported."""
    invocation = Path(config.invocation_params.dir)
    given = [Wanted(key, spec, invocation) for key in KINDS for spec in config.getoption(f"attention_{key}")]
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    from_ini = []
    if not given:
        for line in config.getini("attention_verify"):
            try:
                key, spec = parse_entry(line)
            except ValueError as e:
                raise pytest.UsageError(str(e)) from None
            from_ini.append(Wanted(key, spec, ini_dir, config.inipath))
    wanted = list(dict.fromkeys(given or from_ini))
    twice = {w.spec for w in wanted if sum(v.spec == w.spec for v in wanted) > 1}
    if twice:
        raise pytest.UsageError(f"attention-verify: '{sorted(twice)[0]}' is named under two contracts; name it "
                                "once (impl=, module= or core=)")  # fmt: skip
    dtypes = [d.strip() for text in config.getoption("attention_dtype") for d in text.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise pytest.UsageError(f"--attention-dtype: unknown dtype '{d}'; choose from {', '.join(DTYPE_NAMES)}")
    timeout = config.getoption("attention_timeout")
    if timeout is not None and not 0 < timeout <= WEEK_S:  # NaN and inf fail it too
        raise pytest.UsageError(f"--attention-timeout {timeout:g}: give a finite number of seconds above 0 and at "
                                f"most {WEEK_S}")  # fmt: skip
    args = [str(a) for a in config.args]
    picks = [a for a in args if is_pick(a)]
    if picks and not wanted:
        raise pytest.UsageError(f"{picks[0]}: no implementation is named; set attention_verify in the ini file or "
                                "give --attention-impl SPEC")  # fmt: skip
    paths = [a for a in args if not is_pick(a)]
    if picks:
        config.args[:] = paths  # not paths: pytest would look for a file called attention-verify
    by_default = config.args_source == pytest.Config.ArgsSource.TESTPATHS  # plain `pytest`, the ini's testpaths
    active = bool(wanted) and (bool(given) or bool(picks) or by_default or covers(paths, invocation, ini_dir))
    return Settings(wanted, list(dict.fromkeys(config.getoption("attention_fixture"))), list(dict.fromkeys(dtypes)),
                    bool(config.getoption("attention_quick") or config.getini("attention_verify_quick")),
                    config.getoption("attention_device"), timeout, picks, active)  # fmt: skip


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session: pytest.Session) -> None:
    session.config.stash[SETTINGS] = read_settings(session.config)


# ---------------------------------------------------------------------------------------------------------
# collection: the tree under `attention-verify`, built from the contracts' cases (nothing runs)


class Group(pytest.Collector):
    """A level of the tree: the suite, a fixture (or the kernel matrix), an implementation, a scenario."""

    def __init__(self, *args, children: list | None = None, **kw):
        super().__init__(*args, **kw)
        self.children = children if children is not None else []

    def collect(self):
        return self.children


class Target(Group):
    """A fixture, or a contract's own matrix (the kernels)."""


class Implementation(Group):
    """A spec as the user named it."""


class Scenario(Group):
    """One of the contract's cases."""


class Check(pytest.Item):
    """One (fixture, implementation, scenario, check): passes or fails from its row of the implementation's run."""

    def __init__(self, *args, key: Wanted, target: str, spec: str, scenario: str, check: str, **kw):
        super().__init__(*args, **kw)
        self.key, self.target, self.spec, self.scenario, self.check = key, target, spec, scenario, check
        if key.origin is not None:
            self.path = key.origin  # `-vv` shows where the implementation is named

    def runtest(self) -> None:
        result = self.config.stash[RUNS].result(self.key)
        status, message, props = outcome(result, self.target, self.spec, self.scenario, self.check,
                                         self.key.contract)  # fmt: skip
        self.user_properties.extend(props.items())
        if status == "skipped":
            pytest.skip(message)
        if status == "failed":
            pytest.fail(message, pytrace=False)

    def reportinfo(self):
        return self.path, None, f"{self.target} / {self.spec} / {self.scenario} / {self.check}"


def quiet(fn, *a, **kw):
    """UserError (bad input: a fixture, a spec) -> pytest.UsageError, its one line."""
    from harness.common import UserError  # lazy: torch, only once an implementation is named

    try:
        return fn(*a, **kw)
    except UserError as e:
        raise pytest.UsageError(f"attention-verify: {e}") from None


@contextlib.contextmanager
def folder(path: Path):
    """Run in `path` (a spec's relative paths start there; its worker starts there), then come back."""
    here = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(here)


def build(session: pytest.Session, s: Settings) -> tuple[Group, dict]:
    """The suite's tree and, per Wanted, its Impl (resolved: user code is not imported here)."""
    from harness.common import resolve_device  # lazy: torch, only once an implementation is named
    from harness.verify import contracts  # lazy: the contracts import torch and transformers
    from harness.verify.loop import Context  # lazy: torch
    from harness.verify.plugins import resolve  # lazy: torch
    from harness.verify.run import DTYPES, resolve_fixtures  # lazy: torch and transformers

    device = str(quiet(resolve_device, s.device))
    ctx = Context({DTYPES[d] for d in s.dtypes or DTYPE_NAMES}, s.quick, device=device)
    used = {w.contract: contracts.get(w.contract) for w in s.wanted}
    # a contract with a matrix of its own (core) targets it whatever the fixtures: load none for it alone
    fixtures = []
    if s.fixtures or any(not c.targets([]) for c in used.values()):
        fixtures = quiet(resolve_fixtures, s.fixtures or None)
    suite = Group.from_parent(session, name=NAME, nodeid=NAME)
    impls, by_target = {}, {}
    for w in s.wanted:
        with folder(w.base):
            impl = impls[w] = quiet(resolve, w.spec, w.contract, device=device)
        c = used[w.contract]
        for target in c.targets(fixtures):
            by_target.setdefault(target.name, []).append((w, c, target, impl))
    for name, jobs in by_target.items():
        tnode = Target.from_parent(suite, name=name)
        suite.children.append(tnode)
        for w, c, target, impl in jobs:
            inode = Implementation.from_parent(tnode, name=w.spec)
            tnode.children.append(inode)
            for case in c.cases(target, ctx, impl):
                snode = Scenario.from_parent(inode, name=case.name)
                inode.children.append(snode)
                snode.children += [Check.from_parent(snode, name=check, key=w, target=name, spec=impl.spec,
                                                     scenario=case.name, check=check)
                                   for check in CHECKS.get(w.contract, ("forward",))]  # fmt: skip
    return suite, dict(impls=impls, fixtures=fixtures, device=device)


def leaves(node) -> list:
    return [node] if isinstance(node, pytest.Item) else [i for child in node.collect() for i in leaves(child)]


@pytest.hookimpl(tryfirst=True)  # before -k and --deselect see the items
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    s = config.stash.get(SETTINGS, None)
    if s is None or not s.active:
        return
    suite, made = build(session, s)
    new = leaves(suite)
    for p in s.picks:
        if not any(i.nodeid == p or i.nodeid.startswith(p + "::") for i in new):
            raise pytest.UsageError(f"{p}: no such item (`pytest --collect-only -q {NAME}` lists them)")
    if s.picks:
        new = [i for i in new if any(i.nodeid == p or i.nodeid.startswith(p + "::") for p in s.picks)]
    items.extend(new)
    session.ihook.pytest_collectreport(report=pytest.CollectReport(NAME, "passed", None, new))  # counted, shown
    config.stash[RUNS] = Runs(s, **made)


def pytest_collection_finish(session: pytest.Session) -> None:
    runs = session.config.stash.get(RUNS, None)
    if runs is not None:  # the implementations with items left after -k and --deselect: only these run
        runs.selected = list(dict.fromkeys(i.key for i in session.items if isinstance(i, Check)))


# ---------------------------------------------------------------------------------------------------------
# running: once per implementation, through verify()


@dataclass
class Result:
    rows: list
    verdicts: list
    error: str | None = None  # the run itself stopped (bad input, an error of the harness)


class Runs:
    """The verification of each implementation, run once (on its first item) and kept for the session."""

    def __init__(self, s: Settings, impls: dict, fixtures: list, device: str):
        self.s, self.impls, self.fixtures, self.device = s, impls, fixtures, device
        self.selected: list[Wanted] = []
        self.results: dict[Wanted, Result] = {}
        self.launched: set[Wanted] = set()
        self.cache: dict = {}  # the references, shared by every implementation's run

    def result(self, w: Wanted) -> Result:
        if w not in self.results:
            for other in self.selected:  # every worker imports at once, side by side (as the command line does)
                if other not in self.results and other not in self.launched:
                    with folder(other.base):
                        self.impls[other].launch()
                    self.launched.add(other)
            self.results[w] = self.run(w)
        return self.results[w]

    def run(self, w: Wanted) -> Result:
        import torch  # lazy: only once an implementation runs

        from harness.cli import quiet_dependency_warnings  # lazy: the command line's own warning filter
        from harness.common import UserError  # lazy: torch
        from harness.verify.run import DTYPES, TIMEOUT_S, verify  # lazy: torch and transformers

        impl = self.impls[w]
        timeout = self.s.timeout or TIMEOUT_S
        try:
            with folder(w.base), warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                quiet_dependency_warnings()
                torch.manual_seed(0)  # as the command line: the same verdicts, whatever ran before
                impl.prepare(timeout)
                rows, verdicts = verify(self.fixtures, [impl], {DTYPES[d] for d in self.s.dtypes or DTYPE_NAMES},
                                        self.s.quick, log=lambda *_: None, cache=self.cache, timeout=timeout,
                                        device=self.device)  # fmt: skip
            return Result(rows, verdicts)
        except UserError as e:
            return Result([], [], f"bad input: {e}")
        except Exception as e:  # noqa: BLE001 - every item of this implementation fails with it; the session goes on
            return Result([], [], f"the run stopped: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        finally:
            impl.close()
            self.launched.discard(w)

    def close(self) -> None:
        for w in list(self.launched):
            self.impls[w].close()
        self.launched.clear()


def pytest_sessionfinish(session: pytest.Session) -> None:
    runs = session.config.stash.get(RUNS, None)
    if runs is not None:
        runs.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    runs = config.stash.get(RUNS, None)
    if runs is None or not runs.results:
        return
    from harness.verify import report  # lazy: the harness is loaded by now; the import costs nothing then

    lines: dict[str, bool] = {}  # line -> red; a reference check seen by several runs is said once
    for w, r in runs.results.items():
        if r.error:
            lines[f"ERROR {w.spec}: {r.error.splitlines()[0]}"] = True
        for v in r.verdicts:
            if v.passed and not v.imprecise:
                lines[f"PASS {v.fixture} / {v.impl}"] = False
        for line in report.verdict_lines(r.verdicts) + report.reference_lines(r.rows):
            lines[line] = line.startswith(("FAIL", "REFERENCE"))
    terminalreporter.section(NAME)
    for line, red in lines.items():
        terminalreporter.line(line, red=red, green=not red and line.startswith("PASS "))


# ---------------------------------------------------------------------------------------------------------
# an item's outcome, from its run


def outcome(result: Result, target: str, spec: str, scenario: str, check: str, contract: str):
    """-> (passed | failed | skipped, message, properties) of one item."""
    verdict = next((v for v in result.verdicts if (v.fixture, v.impl) == (target, spec)), None)
    mine = [r for r in result.rows if (r.fixture, r.impl, r.scenario, r.check) == (target, spec, scenario, check)]
    props = {"stage": (verdict.stage or "") if verdict else ""}
    if mine:
        worst = max(mine, key=lambda r: (not r.passed, r.c.max_abs_err))
        props |= {"max_abs_err": worst.c.max_abs_err, "tolerance": worst.c.tolerance,
                  "precision_ratio": worst.c.precision_ratio, "dtype": worst.dtype, "rule": worst.c.rule}  # fmt: skip
    if result.error:
        return "failed", f"{spec}: {result.error}", props
    why = next((r.skipped for r in result.rows if (r.fixture, r.impl, r.scenario) == (target, spec, scenario)
                and r.skipped is not None), None)  # fmt: skip
    if why is not None:  # the scenario was not run (a keyword the kernel does not take): skipped, never passed
        return "skipped", f"{scenario}: not run: {why}", props
    if not mine:
        forward = [r for r in result.rows if (r.fixture, r.impl, r.scenario, r.check) == (target, spec, scenario,
                                                                                          "forward")]  # fmt: skip
        if (contract, check) in OPTIONAL and forward and all(r.error is None for r in forward):
            return "skipped", f"{check}: not returned (optional under the {contract} contract)", props
        head = f"stage {verdict.stage}: {verdict.hint}" if verdict and not verdict.passed else "no result"
        return "failed", (f"{head}\nno row for {target} / {spec} / {scenario} / {check}: the run never produced "
                          "it") + failure_details(verdict, result.rows), props  # fmt: skip
    if all(r.passed for r in mine):
        return "passed", "", props
    return "failed", failure_message(verdict, worst, result.rows), props


def row_line(r, detail: bool = False) -> str:
    c = r.c
    name = r.scenario if r.check == "forward" else f"{r.scenario}:{r.check}"
    if r.error:
        what = f"error: {r.error}"
    elif detail:
        what = (f"max abs err {c.max_abs_err:.2e} > tolerance {c.tolerance:.2e} ({c.rule}); vs float64 "
                f"{c.err_vs_ref64:.2e}" + (f"; {c.nonfinite} NaN/Inf" if c.nonfinite else ""))  # fmt: skip
    else:
        what = f"max abs err {c.max_abs_err:.2e} (tolerance {c.tolerance:.2e})" + (" NaN/Inf" if c.nonfinite else "")
    return f"{name:17s} {r.dtype:8s} {what}"


def failure_message(verdict, row, rows: list) -> str:
    head = f"stage {verdict.stage}: {verdict.hint}" if verdict is not None else "no verdict"
    if not row.error:
        head += f" (max abs err {row.c.max_abs_err:.2e}, tolerance {row.c.tolerance:.2e})"
    return f"{head}\nthis check: {row_line(row, detail=True)}" + failure_details(verdict, rows)


def failure_details(verdict, rows: list) -> str:
    """The verdict of the implementation on the target, its failing rows, a fault's text ("" for a pass)."""
    if verdict is None or verdict.passed:
        return ""
    failing = [r for r in rows if (r.fixture, r.impl) == (verdict.fixture, verdict.impl) and not r.passed]
    text = (f"\nverdict: {verdict.fixture} / {verdict.impl} ({verdict.contract} contract) fails at stage "
            f"{verdict.stage}; failing: {', '.join(verdict.failing) or '-'}")  # fmt: skip
    if failing:
        text += "\nfailing rows:\n" + "\n".join(f"  {row_line(r)}" for r in failing)
    if verdict.error:
        text += f"\nfault:\n{verdict.error.rstrip()}"
    return text
