"""The one check loop: a contract registered from a test file (toy_contract.py, identity attention) runs through
the public loop like the built-in contracts, faults included, in this process and behind the worker boundary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run

from harness.verify import contracts
from harness.verify.plugins import resolve
from harness.verify.run import resolve_fixtures, verify


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(contracts.REGISTRY, "toy", "toy_contract")
    return contracts.get("toy")


@pytest.mark.slow  # two worker processes: the slow tier (make test-fast budget)
def test_a_toy_contract_gets_verdicts_and_faults_from_the_loop(toy):
    fx = resolve_fixtures(["smollm2-135m"])
    specs = ["identity", "doubled", "wrong_shape", "raises", "tests/plugins/toy_impl.py:copy_v",
             "tests/plugins/toy_impl.py:exits"]  # fmt: skip
    impls = [resolve(s, "toy") for s in specs]
    try:
        rows, verdicts = verify(fx, impls, {torch.float32, torch.bfloat16}, quick=True, log=lambda *_: None)
    finally:
        for i in impls:
            i.close()
    v = {x.impl: x for x in verdicts}
    assert [x.impl for x in verdicts] == specs and all(x.contract == "toy" for x in verdicts)
    assert v["identity"].passed and v["tests/plugins/toy_impl.py:copy_v"].passed  # here and in a worker
    doubled = v["doubled"]
    assert (doubled.passed, doubled.stage, doubled.hint) == (False, "scale", "the output is 2x the value")
    assert (v["wrong_shape"].stage, v["raises"].stage) == ("contract", "crash")
    assert "ZeroDivisionError" in v["raises"].hint
    exits = v["tests/plugins/toy_impl.py:exits"]
    assert exits.stage == "crash" and "exited with code 3" in exits.hint
    # one row per case and implementation, each carrying its device; a fault is a failing row with its reason
    assert len(rows) == 2 * len(specs) and all(r.device == "cpu" for r in rows)
    assert {r.scenario for r in rows} == {"one_key_float32", "one_key_bfloat16"}
    assert all(r.error for r in rows if r.impl == "tests/plugins/toy_impl.py:exits")


def test_a_toy_contract_gets_its_own_command_line_option(toy, tmp_path):
    p = run(["-m", "harness", "verify", "--toy", "identity", "--toy", "doubled", "--fixture", "smollm2-135m",
             "--json", str(tmp_path / "v.json")])  # fmt: skip
    assert p.returncode == 1, p.stderr[-2000:]
    doc = json.loads((tmp_path / "v.json").read_text())
    assert [(v["impl"], v["passed"]) for v in doc["verdicts"]] == [("identity", True), ("doubled", False)]
    assert "FAIL smollm2-135m / doubled: stage scale" in p.stdout
