"""The mutation suite as a CI gate: every classic bug caught, >= 90% of stages named right, and no scenario that a
mutant depends on can be removed without this failing."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from conftest import one_line_error, run

from harness import scenarios
from harness.diagnose import STAGES
from harness.mutants import DEFAULT_FIXTURES, MUTANTS, MUTANTS_BY_NAME, Steps, _plugin, run_mutants
from harness.verify import DTYPES, resolve_fixtures, verify

# The bugs the catalog must cover (issue 7), by mutant name.
REQUIRED = {
    "scale_missing", "scale_hidden_size", "softmax_wrong_dim", "softmax_low_precision", "scale_after_softmax",
    "causal_missing", "causal_sees_next", "padding_ignored", "padding_inverted", "masked_rows_nan", "gqa_repeat",
    "head_split_no_transpose", "rope_interleaved", "rope_wrong_sign", "rope_q_only", "rope_on_v",
    "positions_ignored", "llama3_missing", "llama3_factor_8", "angles_bf16", "o_proj_transposed",
    "tiled_no_rescale", "tiled_drops_last_block", "tiled_diagonal_mask", "decode_wrong_position",
}  # fmt: skip
QUIET = {"log": lambda *_: None}


def test_catalog():
    assert len(MUTANTS) >= 24 and len(MUTANTS_BY_NAME) == len(MUTANTS)
    assert REQUIRED <= MUTANTS_BY_NAME.keys(), REQUIRED - MUTANTS_BY_NAME.keys()
    for m in MUTANTS:
        assert m.stage in STAGES and m.stage != "unknown" and m.bug, m


def test_the_unmutated_pipeline_is_correct():
    """Every mutant is this pipeline with one step changed, so the pipeline itself must pass everything."""
    f = resolve_fixtures(["smollm2-135m"])
    _, verdicts = verify(f, [("pipeline", _plugin(Steps()))], set(DTYPES.values()), quick=False, **QUIET)
    assert verdicts[-1]["passed"], verdicts[-1]
    assert len(fields(Steps)) >= 9  # projection, RoPE, GQA, scores, mask, softmax, aggregation, core, output


@pytest.mark.slow
def test_cli_subset_json_and_exit_codes(tmp_path):
    out = tmp_path / "m.json"
    p = run(["-m", "harness", "mutants", "--fixture", "smollm2-135m", "--mutant", "scale_missing",
             "--mutant", "padding_ignored", "--json", str(out)])  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    assert (doc["total"], doc["caught"], doc["diagnosed"]) == (2, 2, 2)
    assert {r["mutant"]: (r["caught"], r["stage"], r["expected"]) for r in doc["rows"]} == {
        "scale_missing": (True, "scale", "scale"),
        "padding_ignored": (True, "padding_mask", "padding_mask"),
    }
    assert "caught 2/2 (100%), stage right 2/2 (100%)" in p.stdout
    # SmolLM2 has no llama3 RoPE scaling: that mutant escapes there, and the command says so with exit 1
    p = run(["-m", "harness", "mutants", "--fixture", "smollm2-135m", "--mutant", "llama3_missing"])
    assert p.returncode == 1 and "caught 0/1" in p.stdout
    bad = run(["-m", "harness", "mutants", "--mutant", "nosuch"])
    assert bad.returncode == 2 and "unknown mutant 'nosuch'" in one_line_error(bad)


# ---------------------------------------------------------------------------------------------------------
# the gate (slow tier, run in CI): the whole catalog on the default fixtures


CACHE: dict = {}  # reference outputs per (fixture, scenario), shared by the runs below


@pytest.fixture(scope="module")
def results():
    return run_mutants(resolve_fixtures(DEFAULT_FIXTURES), cache=CACHE, **QUIET)


@pytest.mark.slow
def test_every_mutant_is_caught(results):
    missed = [r.mutant for r in results if not r.caught]
    assert not missed, f"mutants that pass the harness: {missed}"


@pytest.mark.slow
def test_stages_named_right(results):
    wrong = [(r.mutant, r.stage, r.expected) for r in results if not r.diagnosed]
    right = sum(r.diagnosed for r in results)
    print(f"\n[mutants] stage right {right}/{len(results)}; wrong: {wrong}")
    assert right >= 0.9 * len(results), f"stage right {right}/{len(results)} < 90%: {wrong}"


@pytest.mark.slow
def test_removing_a_scenario_a_mutant_depends_on_fails_the_gate(results, monkeypatch):
    """A mutant caught by a single scenario may depend on it: without that scenario it can escape (unless the
    next fixture catches it), and then the gate above fails. Shown by removing each such scenario and re-running
    the whole escalation for its mutants."""
    sole = {}
    for r in results:
        caught_by = {b.split("/", 1)[1] for b in r.caught_by}
        if len(caught_by) == 1:
            sole.setdefault(caught_by.pop(), []).append(r.mutant)
    escaped = {}
    for scenario, names in sole.items():
        monkeypatch.setattr(scenarios, "SCENARIOS", [s for s in scenarios.SCENARIOS if s.name != scenario])
        again = run_mutants(resolve_fixtures(DEFAULT_FIXTURES), [MUTANTS_BY_NAME[n] for n in names], cache=CACHE,
                            **QUIET)  # fmt: skip
        monkeypatch.undo()
        escaped[scenario] = [r.mutant for r in again if not r.caught]
    print(f"\n[mutants] without this scenario, these mutants escape: {escaped}")
    assert escaped.get("left_padding"), "the padding mutants must depend on left_padding"
    assert sum(map(len, escaped.values())) >= 3
