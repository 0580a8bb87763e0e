"""The catalog and the mutation suite: the catalog's shape, the held-out bugs never reach the diagnosis, the textbook
pipeline is exact, the command's gate (every bug caught, >= 90% of the tuned stages named right, the held-out
accuracy reported, not gated; `make mutants`, run by CI on the whole catalog), and a scenario a bug depends on
cannot be removed without the gate failing."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, run

import harness.verify.diagnosis
from harness.bugs import catalog, pipeline
from harness.bugs.catalog import BY_NAME, CATALOG
from harness.mutants import run_mutants
from harness.reference import Reference64
from harness.stages import STAGES
from harness.verify import scenarios
from harness.verify.run import DTYPES, resolve_fixtures, verify

# The bugs the catalog must cover (issue 7), by mutant name.
REQUIRED = {
    "scale_missing", "scale_hidden_size", "softmax_wrong_dim", "softmax_low_precision", "scale_after_softmax",
    "causal_missing", "causal_sees_next", "padding_ignored", "padding_inverted", "masked_rows_nan", "gqa_repeat",
    "head_split_no_transpose", "rope_interleaved", "rope_wrong_sign", "rope_q_only", "rope_on_v",
    "positions_ignored", "llama3_missing", "llama3_factor_8", "angles_bf16", "o_proj_transposed",
    "tiled_no_rescale", "tiled_drops_last_block", "tiled_diagonal_mask", "decode_wrong_position",
    "rope_table_bf16", "pv_fp16_accumulator",  # with angles_bf16 and softmax_low_precision: the precision four
}  # fmt: skip
QUIET = {"log": lambda *_: None}
# The fallbacks, named when nothing else explains a failure: no bug is written for them
FALLBACKS = {"unknown", "grad_unknown"}
# Named from the diagnosis's own probes and patterns (a wrong single token, the stage-by-stage intermediates), never
# from a catalog suspect: its bugs are all held out
PROBED_ONLY = {"projection"}


def test_catalog():
    names = [b.name for b in CATALOG]
    assert len(set(names)) == len(names), sorted({n for n in names if names.count(n) > 1})
    assert BY_NAME.keys() == set(names)
    assert REQUIRED <= BY_NAME.keys(), REQUIRED - BY_NAME.keys()
    # every stage the diagnosis can be tuned on has a suspect (a bug not held out) to be tuned on, and the mutation
    # suite scores every stage but the fallbacks
    tuned = {b.stage for b in CATALOG if not b.held_out}
    assert set(STAGES) - FALLBACKS - PROBED_ONLY <= tuned, set(STAGES) - FALLBACKS - PROBED_ONLY - tuned
    assert not tuned & PROBED_ONLY, tuned & PROBED_ONLY  # else it is no longer named from probes only: move it
    covered = {b.stage for b in CATALOG}
    assert set(STAGES) - FALLBACKS == covered, set(STAGES) - FALLBACKS ^ covered
    for b in CATALOG:
        assert b.stage in STAGES and b.stage != "unknown" and b.bug and b.hint, b
        assert bool(b.steps) != bool(b.fn), b  # a pipeline change or a whole implementation, not both
        assert set(b.steps) <= {f.name for f in fields(pipeline.Steps)}, b
    held = [b for b in CATALOG if b.held_out]
    assert len(held) >= 8
    assert len({b.stage for b in held}) >= 6  # the held-out set spans the pipeline, not one easy stage


def test_held_out_bugs_never_reach_the_diagnosis():
    """No suspect is built from a held-out entry, and the diagnosis's code names none of them."""
    for f in resolve_fixtures(None):
        assert not any(b.held_out for b in catalog.suspects(f.config))
    source = "".join(p.read_text() for p in Path(harness.verify.diagnosis.__file__).parent.glob("*.py"))
    named = [b.name for b in CATALOG if b.held_out and b.name in source]
    assert not named, f"the diagnosis mentions held-out bugs: {named}"


def test_the_textbook_pipeline_is_correct_and_exact_in_float64():
    """Every bug is this pipeline with one step changed, so the pipeline itself must pass everything; in float64
    it is the suspects' reference, so it must equal each family's transformers attention run in float64."""
    f = resolve_fixtures(["smollm2-135m"])
    _, verdicts = verify(f, [("pipeline", pipeline.layer())], set(DTYPES.values()), quick=False, **QUIET)
    assert verdicts[-1].passed, verdicts[-1]
    assert len(fields(pipeline.Steps)) >= 9  # projection, RoPE, GQA, scores, mask, softmax, aggregation, core, output
    for fx in resolve_fixtures(None):
        for name in ("sparse_positions", "left_padding"):
            x, pos, mask = scenarios.BY_NAME[name].build(fx, torch.float32)
            ours = pipeline.float64(pipeline.layer(), x, fx.weights, pos, mask, fx.layer_config)
            hf = Reference64(fx.config, fx.weights, layer=fx.layer)(x, pos, mask)
            keep = mask.bool() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
            assert float((ours - hf).abs()[keep].max()) < 1e-9, (fx.name, name)


@pytest.mark.gate  # the mutants command end to end: a CI gate (make mutants runs beside it)
def test_cli_subset_json_and_exit_codes(tmp_path):
    out = tmp_path / "m.json"
    p = run(["-m", "harness", "mutants", "--fixture", "smollm2-135m", "--mutant", "scale_missing",
             "--mutant", "padding_inverted", "--json", str(out)])  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    assert (doc["total"], doc["caught"], doc["diagnosed"]) == (2, 2, 2)
    assert (doc["held_out"], doc["diagnosed_held_out"]) == (1, 1)
    assert {r["mutant"]: (r["caught"], r["stage"], r["expected"], r["held_out"]) for r in doc["rows"]} == {
        "scale_missing": (True, "scale", "scale", False),
        "padding_inverted": (True, "padding_mask", "padding_mask", True),
    }
    assert "caught 2/2 (100%), stage right 2/2 (100%)" in p.stdout
    # SmolLM2 has no llama3 RoPE scaling: that mutant escapes there, and the command says so with exit 1
    p = run(["-m", "harness", "mutants", "--fixture", "smollm2-135m", "--mutant", "llama3_missing"])
    assert p.returncode == 1 and "caught 0/1" in p.stdout
    bad = run(["-m", "harness", "mutants", "--mutant", "nosuch"])
    assert bad.returncode == 2 and "unknown mutant 'nosuch'" in one_line_error(bad)


# ---------------------------------------------------------------------------------------------------------
# the gate: `make mutants` (the whole catalog on the default fixtures, exit 1 when a bug escapes or fewer than 90% of
# the tuned stages are right), which CI runs after `make test`; here, that it depends on its scenarios


def test_the_gate_fails_on_an_escape_and_on_wrong_stages(monkeypatch, capsys):
    """The command's exit code is the gate: a bug that escapes, or tuned stages named wrong, is exit 1."""
    from harness import mutants

    def fake(results):
        monkeypatch.setattr(mutants, "run_mutants", lambda fixtures, bugs, **kw: results)
        monkeypatch.setattr(mutants, "report", lambda results: None)
        return mutants.main(["--fixture", "smollm2-135m", "--mutant", "scale_missing"])

    def r(caught, diagnosed, held_out=False):
        return mutants.Result("scale_missing", caught, "scale" if diagnosed else "rope", "scale", held_out,
                              ["smollm2-135m/short"] if caught else [])  # fmt: skip

    assert fake([r(True, True)] * 10) == 0
    assert fake([r(True, True)] * 9 + [r(True, False)]) == 0  # 90% of the tuned stages
    assert fake([r(True, True)] * 8 + [r(True, False)] * 2) == 1
    assert fake([r(True, True)] * 9 + [r(True, False, held_out=True)] * 5) == 0  # held out: reported, not gated
    assert fake([r(True, True)] * 9 + [r(False, False)]) == 1
    assert "GATE FAILED" in capsys.readouterr().out


# mutants caught by one scenario only (left_padding, on the first fixture), as the full suite's last run found them
SOLE = ["padding_ignored", "padding_inverted", "masked_rows_nan"]


@pytest.mark.gate  # the gate's own failure mode: a CI gate, out of make test's budget
def test_removing_a_scenario_a_mutant_depends_on_fails_the_gate(monkeypatch):
    """A mutant caught by a single scenario may depend on it: without that scenario it can escape (unless the
    next fixture catches it), and then the gate fails. Shown by removing each such scenario and re-running the
    whole escalation for its mutants (real weights, then a small synthetic fixture: the full default list costs
    minutes once the mutants escape the first)."""
    cache: dict = {}
    fixtures = resolve_fixtures(["smollm2-135m", "rope-linear-synthetic"])
    results = run_mutants(fixtures, [BY_NAME[n] for n in SOLE], cache=cache, **QUIET)
    assert all(r.caught for r in results)
    sole = {}
    for r in results:
        caught_by = {b.split("/", 1)[1] for b in r.caught_by}
        if len(caught_by) == 1:
            sole.setdefault(caught_by.pop(), []).append(r.mutant)
    escaped = {}
    for scenario, names in sole.items():
        monkeypatch.setattr(scenarios, "SCENARIOS", [s for s in scenarios.SCENARIOS if s.name != scenario])
        again = run_mutants(fixtures, [BY_NAME[n] for n in names], cache=cache, **QUIET)
        monkeypatch.undo()
        escaped[scenario] = [r.mutant for r in again if not r.caught]
    print(f"\n[mutants] without this scenario, these mutants escape: {escaped}")
    assert escaped.get("left_padding"), "the padding mutants must depend on left_padding"
