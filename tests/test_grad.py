"""verify --grad and e2e --train: gradients against transformers through autograd.

The built-ins' gradients pass (layers: x and the four weights; kernels: q, k, v), including exact zeros on padded
rows and keys; each backward bug of the catalog fails with its stage; the gradient rows carry their `check`; a
plug-in whose output does not depend on a weight is a contract fault; training SmolLM2 with `tiled` in every layer
matches transformers step for step, and a backward bug does not.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run

from harness.bugs.catalog import CATALOG, pick
from harness.verify.plugins import resolve
from harness.verify.run import DTYPES, builtin, resolve_fixtures, verify

QUIET = {"log": lambda *_: None}
# ring's backward bugs need a process group: tests/test_ring_bugs.py runs them on gloo ranks
BACKWARD = [b.name for b in CATALOG if b.kind == "backward" and b.contract != "ring"]


@pytest.fixture(scope="module")
def refs():
    return {}


@pytest.mark.parametrize("name", ["naive", "loop", "tiled", "sdpa"])
def test_builtin_layer_gradients_pass(name, refs):
    rows, (v,) = verify(resolve_fixtures(["smollm2-135m"]), [resolve(name)], {torch.float32, torch.bfloat16},
                        quick=True, cache=refs, grad=True, **QUIET)  # fmt: skip
    checks = {r.check for r in rows if r.impl == name}
    assert {"forward", "grad_x", "grad_q_proj", "grad_k_proj", "grad_v_proj", "grad_o_proj"} <= checks
    assert v.passed, [(r.scenario, r.check, r.c.max_abs_err, r.c.tolerance) for r in rows if not r.passed]
    assert not v.imprecise
    padded = [r for r in rows if r.impl == name and r.scenario == "left_padding" and r.check == "grad_x"]
    assert padded and padded[0].c.passed  # exact zeros where transformers' are


# triton's backward kernels: tests/test_triton.py against float64, and `make verify-grad` (CI) on this matrix
@pytest.mark.parametrize("name", ["naive", "tiled", pytest.param("sdpa", marks=pytest.mark.slow)])
def test_builtin_kernel_gradients_pass(name, refs):
    rows, (v,) = verify([], [resolve(name, "core")], set(DTYPES.values()), quick=True, cache=refs, grad=True, **QUIET)
    assert {"grad_q", "grad_k", "grad_v"} <= {r.check for r in rows}
    assert v.passed, [(r.scenario, r.check, r.c.max_abs_err) for r in rows if not r.passed]


# Every built-in on every fixture and the full kernel matrix, gradients included, is `make verify-grad`, which CI
# runs after `make test` (its last run: docs/grad.md).


FAST = {"grad_gqa_first", "grad_rope_forward_rotation"}  # the rest: slow tier (and the mutation gate)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in BACKWARD])
def test_backward_bugs_fail_with_their_stage(name, refs):
    bug = pick(name)
    impl = builtin(name, bug.kernel(), "core") if bug.contract == "core" else builtin(name, bug.layer())
    fixtures = resolve_fixtures(["smollm2-135m"]) if bug.contract == "layer" else []
    rows, (v,) = verify(fixtures, [impl], set(DTYPES.values()), quick=False, cache=refs, grad=True, **QUIET)
    ran = [r for r in rows if r.check == "forward" and r.skipped is None]  # plain attention: keyword scenarios skip
    assert ran and all(r.passed for r in ran), "its forward is right"
    assert not v.passed and v.stage == bug.stage, (v.stage, v.hint)


def test_the_catalog_has_eight_backward_bugs_or_more():
    assert len(BACKWARD) >= 8
    assert all(pick(n).stage.startswith("grad_") for n in BACKWARD)


@pytest.mark.slow
def test_cli_grad_json_and_a_missing_gradient(tmp_path):
    plugin = tmp_path / "detached.py"
    plugin.write_text("from impl import naive\n\n"
                      "def attention(x, weights, **kw):\n"
                      "    w = dict(weights, o_proj=weights['o_proj'].detach())  # o_proj's gradient never flows\n"
                      "    return naive.attention(x, w, **kw)\n")  # fmt: skip
    out = tmp_path / "g.json"
    p = run(["-m", "harness", "verify", "--grad", "--quick", "--fixture", "smollm2-135m", "--dtype", "float32",
             "--impl", "sdpa", "--impl", f"{plugin}:attention", "--json", str(out)])  # fmt: skip
    assert p.returncode == 1, p.stdout[-2000:]
    doc = json.loads(out.read_text())
    assert {r["check"] for r in doc["results"] if r["impl"] == "sdpa"} >= {"forward", "grad_x", "grad_o_proj"}
    v = {x["impl"]: x for x in doc["verdicts"]}
    assert v["sdpa"]["passed"] is True
    bad = v[f"{plugin}:attention"]
    assert bad["stage"] == "contract" and "o_proj" in bad["hint"]


@pytest.mark.gate  # a whole model trained twice: the CI gate (make test-gate)
def test_training_with_tiled_matches_transformers(tmp_path):
    """Two prompts of different lengths (a left-padded batch), step 0 and two AdamW steps: `make e2e`-style
    training with the default prompts and 10 steps is in docs/grad.md."""
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["The capital of France is", "Explain attention in one short sentence, please."]))
    out = tmp_path / "t.json"
    p = run(["-m", "harness", "e2e", "--train", "--impl", "tiled", "--steps", "2", "--prompts", str(prompts),
             "--json", str(out)])  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:]
    doc = json.loads(out.read_text())
    assert doc["passed"] and len(doc["loss_ref"]) == 3
    assert max(abs(a - b) for a, b in zip(doc["loss_ref"], doc["loss_impl"], strict=True)) <= doc["loss_tol"]
    assert doc["worst_grad"]["rel_err"] <= doc["grad_rtol"]
    p = run(["-m", "harness", "e2e", "--train", "--impl", "tests/plugins/broken.py:grad_rope_forward_rotation",
             "--steps", "0", "--prompts", str(prompts)])  # fmt: skip
    assert p.returncode == 1 and "NOT OK" in p.stdout
