"""The precision verdict: every check's distance from float64 against transformers' own, the four precision bugs of
the catalog imprecise or failing with their precision stage, named by the error's signature (with and without
--quick; the held-out ones: tests/test_signature.py), --strict failing them,
the built-ins and transformers' sdpa path never imprecise, and --plot drawing where the error sits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run

from harness.bugs.catalog import pick
from harness.verify.compare import PRECISION_LIMIT
from harness.verify.plugins import resolve
from harness.verify.run import DTYPES, builtin, resolve_fixtures, verify

FOUR = ["rope_table_bf16", "angles_bf16", "softmax_low_precision", "pv_fp16_accumulator"]
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def refs():
    return {}


@pytest.mark.parametrize("quick", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["quick", "full"])
@pytest.mark.parametrize("name", FOUR)
def test_precision_bugs_get_their_precision_stage(name, quick, refs):
    bug = pick(name)
    rows, (v,) = verify(resolve_fixtures(["smollm2-135m"]), [(name, bug.layer())], set(DTYPES.values()), quick=quick,
                        cache=refs, **QUIET)  # fmt: skip
    assert v.stage == bug.stage and bug.stage.endswith("_precision"), (v.stage, v.hint)
    assert v.matched.startswith("signature:"), v.matched  # named by the error's signature, not by the catalog entry
    assert (not v.passed) or v.imprecise, v  # never a plain pass
    assert v.precision_ratio > PRECISION_LIMIT
    if v.passed:
        assert "less precise than transformers" in v.hint


@pytest.mark.slow
def test_strict_fails_each_precision_bug_and_the_json_carries_the_ratio(tmp_path):
    out = tmp_path / "p.json"
    specs = [a for n in FOUR for a in ("--impl", f"tests/plugins/broken.py:{n}")]
    args = ["-m", "harness", "verify", "--fixture", "smollm2-135m", "--quick", "--dtype", "float32", *specs]
    lax = run([*args, "--impl", "naive", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert all("precision_ratio" in r and "imprecise" in r for r in doc["results"])
    assert all("imprecise" in v for v in doc["verdicts"])
    assert doc["summary"]["imprecise"] > 0 and "PASS*" in lax.stdout
    p = run([*args, "--impl", "naive", "--strict", "--json", str(out)])  # --strict: each of the four is a failure
    assert p.returncode == 1, p.stdout[-1500:]
    v = {x["impl"]: x for x in json.loads(out.read_text())["verdicts"]}
    for n in FOUR:
        assert not v[f"tests/plugins/broken.py:{n}"]["passed"] or v[f"tests/plugins/broken.py:{n}"]["imprecise"], n
        assert f"FAIL smollm2-135m / tests/plugins/broken.py:{n}" in p.stdout or (
            f"FAIL (--strict) smollm2-135m / tests/plugins/broken.py:{n}" in p.stdout), n
    assert v["naive"]["passed"] and not v["naive"]["imprecise"]  # a built-in passes --strict (every one: make verify)


def test_builtins_and_transformers_sdpa_are_never_imprecise(refs):
    """The quick matrix here; the full one in test_verify's gate (every built-in, every fixture, --strict)."""
    rows, verdicts = verify(resolve_fixtures(None), [resolve(n) for n in ("naive", "tiled", "sdpa")], {torch.float32,
                            torch.bfloat16}, quick=True, cache=refs, **QUIET)  # fmt: skip
    assert not [r for r in rows if r.c.imprecise], [(r.impl, r.scenario, r.c.precision_ratio) for r in rows]
    assert all(v.passed and not v.imprecise for v in verdicts)
    worst = max(r.c.precision_ratio for r in rows if r.impl == "hf-sdpa")
    assert worst < PRECISION_LIMIT / 4, worst  # the limit has room above transformers' own sdpa path


def test_a_half_precision_kernel_is_named_by_its_step():
    from harness.bugs import mistakes, pipeline

    impl = builtin("softmax_fp16_kernel", pipeline.core(softmax=mistakes.softmax_in(torch.float16)), "core")
    _, (v,) = verify([], [impl], {torch.float32}, quick=True, **QUIET)
    assert v.stage == "softmax_precision" and (v.imprecise or not v.passed), v
    assert v.matched == "signature:softmax_computed/float16", v.matched


@pytest.mark.slow
def test_plot_draws_where_the_error_sits(tmp_path):
    p = run(["-m", "harness", "verify", "--fixture", "smollm2-135m", "--quick", "--dtype", "float32",
             "--impl", "tests/plugins/broken.py:rope_table_bf16", "--impl", "naive", "--plot", str(tmp_path / "pics")])
    assert p.returncode == 1  # rope_stress catches the bfloat16 table outright
    (png,) = (tmp_path / "pics").iterdir()  # one picture: the innocent one has none
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "rope_table_bf16" in png.name
    bad = tmp_path / "file"
    bad.write_text("x")
    q = run(["-m", "harness", "verify", "--quick", "--impl", "naive", "--plot", str(bad)])
    assert q.returncode == 2 and "--plot" in q.stderr
