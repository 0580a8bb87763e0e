"""Implementations under test, behind one interface whatever their contract and wherever they run.

An implementation is a SPEC (specs.py) under a contract (contracts/). `call` runs the contract's `serve` on inputs
and returns what the code returned, as descriptions (worker.describe) and tensors; the contract checks them
against what it promised before anything compares them. Built-ins run `serve` in this process on fresh copies of
every input; everything else runs in a worker process (worker.py) that imports the code and runs the same `serve`.
"""

from __future__ import annotations

import os
import sys
import time
from importlib.machinery import PathFinder
from pathlib import Path

from harness.common import ROOT, UserError
from harness.verify import contracts
from harness.verify.specs import import_spec
from harness.verify.worker import Fault, Worker, accepts, reply_limit, results, signature_of
from impl import IMPLEMENTATIONS, INTERPRETED_ON_CPU, sdpa

LAYOUTS = ("hf", "meta")


class Impl:
    """An implementation under test. `deadline` (time.monotonic()) bounds every call until it is changed."""

    def __init__(self, spec: str, contract: str, layout: str = "hf", device: str = "cpu"):
        self.spec, self.contract, self.layout, self.device = spec, contract, layout, device
        self.deadline: float | None = None

    @property
    def builtin(self) -> bool:
        return False

    @property
    def interpreted(self) -> bool:
        """Run in Triton's interpreter here (on a CPU): slow, so it gets the shorter scenario lists."""
        return False

    @property
    def alive(self) -> bool:
        """Can it still answer? (A worker that died or was killed for its time cannot.)"""
        return True

    @property
    def backend(self) -> str | None:
        """What actually ran, where an implementation chooses (sdpa's backend), for the report."""
        return None

    def accepts(self, name: str) -> bool:
        """Does its signature take the keyword `name` (a contract's optional keyword, e.g. a kernel's window)? A
        scenario that needs one it does not take is skipped (never a pass)."""
        return True

    def call(self, contract, header: dict, tensors: dict, doing: str, preload: tuple | None = None,
             expect: int | None = None):  # fmt: skip
        """contract.serve(code, header, tensors, state) where the code runs -> (descriptions, items): what it
        returned, not yet checked against the contract. preload: (key, config, weights) that header["key"] names
        (sent once per key). expect: the most numbers the contract's outputs hold (a larger reply is `contract`,
        unread); by default as many as the inputs and the weights hold (gradients are their size)."""
        raise NotImplementedError

    def launch(self) -> None:
        """Start importing the code without waiting (several implementations' workers import side by side)."""

    def prepare(self, timeout: float) -> None:
        """Import the code now, so a spec that names nothing importable is bad input before any work is done."""

    def forget(self, key: str) -> None:
        """The weights under this key changed (a training step): send them again on the next call."""

    def reset(self) -> None:
        """Forget state after a fault (a worker is killed; the next call starts a fresh one)."""

    def close(self) -> None:
        self.reset()


class Builtin(Impl):
    """A built-in (impl/ or the bug catalog): trusted code, run here, on fresh copies of every input."""

    def __init__(self, spec: str, contract: str, fn, **kw):
        super().__init__(spec, contract, **kw)
        self.fn = fn
        self.modules: dict = {}  # what a module contract builds, per weights key

    @property
    def builtin(self) -> bool:
        return True

    @property
    def backend(self) -> str | None:
        if self.spec != "sdpa":
            return None
        return sdpa.last_backend  # the backend that ran last (a silent fall-back shows here)

    @property
    def interpreted(self) -> bool:
        return self.spec in INTERPRETED_ON_CPU and not str(self.device).startswith("cuda")

    def accepts(self, name: str) -> bool:
        return accepts(signature_of(self.fn), name)

    def _on(self, t):
        """A fresh copy on this implementation's device: nothing it does reaches the caller's tensor."""
        return None if t is None else t.to(self.device, copy=True)

    def call(self, contract, header, tensors, doing, preload=None, expect=None):
        state = {"weights": {}, "configs": {}, "modules": self.modules}
        if preload is not None:
            key, config, w = preload
            state["weights"][key], state["configs"][key] = {k: self._on(v) for k, v in w.items()}, config
        value = contract.serve(self.fn, {**header, "device": str(self.device)},
                               {k: self._on(v) for k, v in tensors.items()}, state)  # fmt: skip
        items = list(value) if isinstance(value, tuple) else [value]
        return results(value)[0], items


class Isolated(Impl):
    """User code, run in its worker process; nothing it does reaches this process."""

    def __init__(self, spec: str, contract: str, **kw):
        super().__init__(spec, contract, **kw)
        self.worker = Worker(spec, contract, self.device, serving(contracts.get(contract)).partition(":")[0])
        self.early: Fault | None = None  # a fault while importing, given as the first call's verdict

    def launch(self) -> None:
        self.worker.launch()

    def prepare(self, timeout: float) -> None:
        try:
            self.worker.start(time.monotonic() + timeout)
        except Fault as e:
            self.early = e

    def forget(self, key: str) -> None:
        self.worker.sent.discard(key)

    @property
    def alive(self) -> bool:
        return self.worker.proc is not None

    def accepts(self, name: str) -> bool:
        """As its worker said when its code was imported (the worker is started for it if it was not yet)."""
        if self.worker.signature is None and self.early is None:
            self.prepare(max(0.0, self.deadline - time.monotonic()) if self.deadline is not None else 900.0)
        if self.early is not None:
            return True  # its next call gives the import's fault, as its verdict
        return accepts(self.worker.signature, name)

    def call(self, contract, header, tensors, doing, preload=None, expect=None):
        if self.early is not None:
            fault, self.early = self.early, None
            raise fault
        if preload is not None:
            self.worker.weights(*preload, self.deadline)
        if expect is None:  # gradients are as large as what they are taken of
            weights = preload[2] if preload is not None else {}
            expect = sum(t.numel() for t in [*tensors.values(), *weights.values()])
        _, descs, out = self.worker.call({**header, "op": "call", "serve": serving(contract)}, tensors,
                                         self.deadline, doing, reply_limit(expect))  # fmt: skip
        return descs, [out.get(f"r{i}") for i in range(len(descs))]

    def reset(self) -> None:
        self.worker.stop()


def serving(contract) -> str:
    """`module:function` a worker runs for this contract: its SERVE, else the contract module's own serve."""
    return getattr(contract, "SERVE", f"{contract.__name__}:serve")


def resolve(spec: str, contract: str = "layer", *, layout: str = "hf", device: str = "cpu") -> Impl:
    """A spec as given on the command line -> an Impl. The user's code is not imported here (its worker does)."""
    c = contracts.get(contract)
    builtins = c.builtins()
    if hasattr(c, "implementation"):  # a contract whose code runs its own way (the ring: a process per rank)
        return c.implementation(spec, builtins.get(spec), device)
    if spec in builtins:
        return Builtin(spec, contract, builtins[spec], layout=layout, device=device)
    if ":" not in spec:
        known = ", ".join(builtins) or "none (give module:name)"
        raise UserError(f"unknown implementation '{spec}' for the {contract} contract; built-ins: {known}, or give "
                        "package.module:name (or path/to/file.py:name)")  # fmt: skip
    check_spec(spec)
    return Isolated(spec, contract, layout=layout, device=device)


def check_spec(spec: str) -> None:
    """What can be told of a SPEC without running any of its code: its form, that its file exists, that its
    top-level module can be found. Anything else (its import raising, a missing name) is the worker's to find,
    and a verdict for that implementation only."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name.strip():
        raise UserError(f"'{spec}': no module before ':'; give package.module:name or path/to/file.py:name")
    if not attr.isidentifier():
        raise UserError(f"'{spec}': '{attr}' is not a Python name; give module:name or path/to/file.py:name")
    if mod_name.endswith(".py"):
        path = Path(mod_name).expanduser()
        if not path.is_file():
            raise UserError(f"{mod_name}: no such file; give path/to/file.py:name")
        if not os.access(path, os.R_OK):
            raise UserError(f"{mod_name}: not readable; give a Python file this user can read")
        return
    if not all(part.isidentifier() for part in mod_name.split(".")):
        raise UserError(f"'{mod_name}' is not a module name; give package.module:name or path/to/file.py:name")
    top = mod_name.split(".")[0]
    # found as the worker will find it (the checkout, the working directory, sys.path), without importing it
    where = [str(ROOT), os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep), *sys.path]
    if top not in sys.builtin_module_names and PathFinder.find_spec(top, [p for p in where if p]) is None:
        raise UserError(f"cannot import '{mod_name}' (no module named '{top}'); check the module path and that it "
                        "is importable from this directory")  # fmt: skip


def builtin(name: str, fn, contract: str = "layer") -> Impl:
    """Harness code under test in this process (the bug catalog, tests); a ring kernel in its rank processes."""
    c = contracts.get(contract)
    if hasattr(c, "implementation"):
        return c.implementation(name, fn, "cpu")
    return Builtin(name, contract, fn)


def resolve_impl(spec: str):
    """(name as given, the layer-contract callable) for a built-in or, in this process, a user's module (the bug
    catalog's tests and the e2e tests use it; `verify` and `e2e` isolate user code through `resolve`)."""
    return spec, import_spec(spec, IMPLEMENTATIONS)
