"""The contracts: what a kind of code under test is given, what it returns, and how it is judged. A contract is
one module here; the loop (verify/loop.py) runs any of them. A module defines:

    NAME, OPTION, HELP      its name, its command-line option (None: run only after another, e.g. gradients), help
    GRAD                    the contract of its gradients, run after it passes under --grad (or None)
    builtins()              name -> the built-in implementations
    targets(fixtures)       what it runs on: fixtures, or one matrix of its own
    cases(target, ctx, impl)                    the inputs, seeded; each has .name and .dtype
    reference(target, case, ctx, device)        transformers in the case's dtype and in float64, cached
    reference_rows(target, cases, ctx, device)  checks of the reference itself (optional)
    serve(code, header, tensors, state)         calls the code: in its worker, or here for a built-in; SERVE
                                                (`module:function`, optional) points the worker at a lighter
                                                module holding the same function (the built-ins' are in serve.py)
    call(impl, target, case, ref)               the inputs out, the reply checked against the contract (Fault)
    not_run(case, ref)                          the comparison of a case the code gave no output for
    compare(target, case, ref, got)             [(check, Comparison)]: out, lse, gradients, ...
    evidence(target, case, ref, got)            what the diagnosis needs of a case
    diagnose(target, evidence, failed, passing, impl, ctx)        -> Diagnosis
    diagnose_precision(target, evidence, imprecise, impl, ctx)    -> Diagnosis (optional)

Adding a contract: one module, one line in REGISTRY (or `register` from elsewhere).
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {
    "layer": "harness.verify.contracts.layer",
    "module": "harness.verify.contracts.module",
    "core": "harness.verify.contracts.core",
    "layer_grad": "harness.verify.contracts.layer_grad",
    "core_grad": "harness.verify.contracts.core_grad",
    "paged": "harness.verify.contracts.paged",
    "varlen": "harness.verify.contracts.varlen",
    "ring": "harness.verify.contracts.ring",
    "ring_grad": "harness.verify.contracts.ring_grad",
}


def register(name: str, module: str) -> None:
    """A contract defined elsewhere (a plug-in's, a test's): `module` must be importable by its name."""
    REGISTRY[name] = module


def get(name: str) -> ModuleType:
    return importlib.import_module(REGISTRY[name])


def with_options() -> list[ModuleType]:
    """The contracts a user names on the command line, in registry order."""
    return [m for m in map(get, REGISTRY) if m.OPTION]
