"""The plug-in boundary: user code runs in its own worker process, every fault becomes its named verdict (never a
pass), an innocent implementation's verdict does not depend on what ran before it, and the three contracts
(layer, module, kernel) verify correct code and fail broken code with the right stage.

The command line is run as a user runs it (a subprocess) where exit codes and the JSON are the point; the kernel
contract's diagnosis is checked in-process on the catalog's kernel bugs.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import one_line_error, run

from harness.bugs.catalog import CATALOG, pick
from harness.checkpoints.extract import extract
from harness.verify import kernels
from harness.verify.plugins import resolve
from harness.verify.run import DTYPES, builtin, resolve_fixtures, verify

HOSTILE = "tests/plugins/hostile.py"
QUICK = ["--fixture", "smollm2-135m", "--quick", "--dtype", "float32"]


def verify_cli(tmp_path, *args, timeout=600):
    out = tmp_path / "v.json"
    p = run(["-m", "harness", "verify", *args, "--json", str(out)], timeout=timeout)
    assert "Traceback" not in p.stdout, p.stdout[-3000:]
    doc = json.loads(out.read_text()) if out.exists() else None
    return p, doc


def verdicts(doc) -> dict:
    return {v["impl"]: v for v in doc["verdicts"]}


def test_exit_and_exception_are_crash_verdicts(tmp_path):
    p, doc = verify_cli(tmp_path, *QUICK, "--impl", f"{HOSTILE}:exits_zero", "--impl", f"{HOSTILE}:raises",
                        "--impl", f"{HOSTILE}:attention")  # fmt: skip
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr
    v = verdicts(doc)
    ex = v[f"{HOSTILE}:exits_zero"]
    assert (ex["passed"], ex["stage"]) == (False, "crash") and "exited with code 0" in ex["hint"]
    r = v[f"{HOSTILE}:raises"]
    assert (r["passed"], r["stage"]) == (False, "crash")
    assert "RuntimeError: the kernel was not compiled for this shape" in r["hint"]
    assert "Traceback" in r["error"] and "hostile.py" in r["error"]  # the traceback travels in the JSON
    assert v[f"{HOSTILE}:attention"]["passed"] is True  # the run went on
    assert f"FAIL smollm2-135m / {HOSTILE}:exits_zero: stage crash" in p.stdout


@pytest.mark.slow
def test_hang_is_a_timeout_and_the_worker_is_killed(tmp_path):
    t0 = time.monotonic()
    p, doc = verify_cli(tmp_path, *QUICK, "--impl", f"{HOSTILE}:hangs", "--timeout", "4")
    assert time.monotonic() - t0 < 120
    assert p.returncode == 1
    (v,) = doc["verdicts"]
    assert (v["passed"], v["stage"]) == (False, "timeout") and "killed" in v["hint"]
    assert all(r["error"] for r in doc["results"] if r["impl"].endswith(":hangs"))


@pytest.mark.slow
def test_every_fault_is_its_verdict(tmp_path):
    want = {
        "os_exit": ("crash", "exited with code 0"),
        "float64_output": ("contract", "float64"),
        "wrong_shape": ("contract", "[1, 1, 576]"),
        "meta_tensor": ("contract", "meta"),
        "sparse_tensor": ("contract", "sparse"),
        "not_a_tensor": ("contract", "builtins.list"),
    }
    args = [a for name in want for a in ("--impl", f"{HOSTILE}:{name}")]
    p, doc = verify_cli(tmp_path, *QUICK, *args, "--impl", "tests/plugins/exits_at_import.py:attention")
    assert p.returncode == 1
    v = verdicts(doc)
    for name, (stage, words) in want.items():
        got = v[f"{HOSTILE}:{name}"]
        assert (got["passed"], got["stage"]) == (False, stage) and words in got["hint"], got
    imp = v["tests/plugins/exits_at_import.py:attention"]
    assert imp["stage"] == "crash" and "exited with code 0" in imp["hint"] and "importing" in imp["hint"]


@pytest.mark.gate  # workers run twice over: a CI gate, out of make test's budget
def test_an_innocent_verdict_does_not_depend_on_what_ran_before(tmp_path):
    """Hostile plug-ins that edit their inputs, change torch's default dtype or patch the comparison run first;
    the innocent one (and a built-in after them) must get exactly the rows it gets alone."""
    alone, doc_alone = verify_cli(tmp_path, *QUICK, "--impl", f"{HOSTILE}:attention", "--impl", "naive")
    hostile = ["edits_inputs", "default_float64", "patches_the_judge", "prints", "looks_itself_up"]
    args = [a for h in hostile for a in ("--impl", f"{HOSTILE}:{h}")]
    after, doc_after = verify_cli(tmp_path, *QUICK, *args, "--impl", f"{HOSTILE}:attention", "--impl", "naive")

    def rows(doc, impl):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in doc["results"] if r["impl"] == impl]

    for impl in (f"{HOSTILE}:attention", "naive"):
        assert rows(doc_after, impl) == rows(doc_alone, impl) and rows(doc_alone, impl)
    v = verdicts(doc_after)
    for h in ("edits_inputs", "default_float64", "prints", "looks_itself_up"):  # correct outputs: they pass
        assert v[f"{HOSTILE}:{h}"]["passed"] is True, v[f"{HOSTILE}:{h}"]
    assert v[f"{HOSTILE}:patches_the_judge"]["passed"] is False  # patching its own process forges nothing


def test_fixtures_with_the_same_folder_name_keep_their_own_references(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 1, "vocab_size": 300,
                               "intermediate_size": 64, "max_position_embeddings": 4096, "rope_theta": 10000.0}))
    a = extract(layer=0, out=tmp_path / "a" / "fx", config_path=cfg, synthetic=True, seed=1, log=lambda *_: None)
    b = extract(layer=0, out=tmp_path / "b" / "fx", config_path=cfg, synthetic=True, seed=2, log=lambda *_: None)
    fixtures = resolve_fixtures([str(a), str(b)])
    assert fixtures[0].name == fixtures[1].name == "fx"
    _, vs = verify(fixtures, [resolve("naive")], {torch.float32}, quick=True, log=lambda *_: None, cache={})
    assert [v.passed for v in vs] == [True, True], vs


@pytest.mark.slow
def test_module_contract_with_both_weight_layouts(tmp_path):
    spec = "docs/examples/fused_qkv_module.py:build"
    p, doc = verify_cli(tmp_path, *QUICK, "--module", spec, "--weights-layout", "meta")
    assert p.returncode == 0, p.stdout[-2000:]
    assert verdicts(doc)[spec]["contract"] == "module"
    p, doc = verify_cli(tmp_path, *QUICK, "--module", spec)  # HF's row order into an interleaved-pair module
    assert p.returncode == 1
    v = verdicts(doc)[spec]
    assert (v["passed"], v["stage"], v["contract"]) == (False, "rope", "module")


@pytest.mark.slow
def test_kernel_contract_example_passes_the_quick_matrix(tmp_path):
    p, doc = verify_cli(tmp_path, "--quick", "--core", "docs/examples/kernel.py:attn")
    assert p.returncode == 0, p.stdout[-2000:]
    assert any(r["check"] == "lse" for r in doc["results"])  # its lse was checked too
    assert {r["scenario"] for r in doc["results"]} >= {"decode_1", "chunk_17_of_300", "padding", "noncausal"}


KERNEL_BUGS = ["causal_top_left", "lse_base2", "gqa_repeat", "scale_missing", "padding_ignored", "causal_missing",
               "softmax_wrong_dim", "scale_arg_ignored", "causal_flag_ignored", "lse_unscaled"]  # fmt: skip


@pytest.mark.parametrize("name", KERNEL_BUGS)
def test_kernel_bugs_fail_with_their_stage(name, kernel_refs):
    bug = pick(name)
    impl = builtin(name, bug.kernel(), "core")
    rows, (v,) = verify([], [impl], set(DTYPES.values()), quick=True, log=lambda *_: None, cache=kernel_refs)
    assert not v.passed and v.stage == bug.stage, (v.stage, v.hint)
    assert v.contract == "core" and v.fixture == "kernels"


@pytest.fixture(scope="module")
def kernel_refs():
    return {}


def test_every_kernel_bug_of_the_catalog_is_tested():
    # backward: test_grad; window, softcap and sinks: test_kernel_diagnosis (on the scenarios that use them)
    expressible = {b.name for b in CATALOG if b.contract == "core" and b.kind == "forward"
                   and b.stage not in ("sliding_window", "softcap", "sinks")}  # fmt: skip
    assert expressible <= set(KERNEL_BUGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["naive", "loop", "tiled", "sdpa"])
def test_builtin_cores_pass_the_whole_kernel_matrix(name, kernel_refs):
    rows, (v,) = verify([], [resolve(name, "core")], set(DTYPES.values()), quick=False, log=lambda *_: None,
                        cache=kernel_refs)  # fmt: skip
    assert v.passed, [(r.scenario, r.check, r.c.max_abs_err) for r in rows if not r.passed]
    assert not v.skipped and all(r.skipped is None for r in rows), v.skipped  # window, softcap, sinks: all run
    assert {r.scenario for r in rows} == {s.name for s in kernels.SCENARIOS}


HF_KERNELS = "tests/plugins/hf_kernels.py"
KEYWORD_SCENARIOS = {s.name for s in kernels.SCENARIOS if s.quick and s.uses()}


@pytest.mark.slow
def test_a_kernel_without_the_keywords_skips_their_scenarios(tmp_path):
    """Its plain scenarios run and pass; window/softcap/sinks ones are SKIP rows listed in the verdict, counted in
    the summary, <skipped/> in JUnit: a pass without --strict (the verdict line says so), a failure with it. A
    kernel whose signature claims `window` and does not take it crashes on them: its own verdict only."""
    spec, liar = f"{HF_KERNELS}:no_keywords", f"{HF_KERNELS}:claims_window"
    junit = tmp_path / "j.xml"
    p, doc = verify_cli(tmp_path, "--quick", "--core", spec, "--core", liar, "--junit", str(junit))
    v = verdicts(doc)
    assert v[spec]["passed"] is True and p.returncode == 1  # the liar's crash fails the run, not this kernel
    assert {x["scenario"] for x in v[spec]["skipped"]} == KEYWORD_SCENARIOS
    assert all("keyword" in x["why"] and "in its signature" in x["why"] for x in v[spec]["skipped"])
    mine = [r for r in doc["results"] if r["impl"] == spec]
    assert {r["scenario"] for r in mine if r["skipped"] is None} == {s.name for s in kernels.select(
        set(DTYPES.values()), True)} - KEYWORD_SCENARIOS and all(r["passed"] for r in mine if r["skipped"] is None)
    n = len(KEYWORD_SCENARIOS)
    assert f"PASS (with skips) kernels / {spec}: {n} scenarios skipped" in p.stdout
    n_skip = doc["summary"]["skipped"]
    assert n_skip == n + len(v[liar]["skipped"]) and f"; {n_skip} skipped" in p.stdout
    assert junit.read_text().count("<skipped") == n_skip
    assert (v[liar]["passed"], v[liar]["stage"]) == (False, "crash") and "window" in v[liar]["hint"]
    assert {x["scenario"] for x in v[liar]["skipped"]} == {s for s in KEYWORD_SCENARIOS
                                                           if kernels.BY_NAME[s].uses() != ("window",)}  # fmt: skip
    alone, doc = verify_cli(tmp_path, "--quick", "--core", spec, "--dtype", "float32")
    assert alone.returncode == 0, alone.stdout[-2000:]
    strict, doc = verify_cli(tmp_path, "--quick", "--core", spec, "--dtype", "float32", "--strict", "--junit",
                             str(junit))  # fmt: skip
    assert strict.returncode == 1 and f"FAIL (--strict) kernels / {spec}: " in strict.stdout
    assert junit.read_text().count('type="skipped"') == doc["summary"]["skipped"] > 0


@pytest.mark.parametrize("args, needle", [
    (["--core", "nosuch"], "for the core contract"),
    (["--module", "naive"], "for the module contract"),
    (["--impl", "tests/plugins/nosuch.py:attention"], "no such file"),
    (["--impl", "tests/plugins/hostile.py:not a name"], "not a Python name"),
    (["--timeout", "0"], "--timeout 0"),
    (["--weights-layout", "gguf"], "invalid choice"),
])  # fmt: skip
def test_bad_specs_are_one_line_exit_2(args, needle):
    p = run(["-m", "harness", "verify", "--quick", *args])
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    assert needle in one_line_error(p)


