"""The harness: the built-ins pass the full matrix (this is CI's gate on attention changes), broken
implementations fail with the right stage, and the CLI keeps its interface (exit codes, JSON, determinism)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from conftest import FIXTURES, one_line_error, run

from harness.bugs.catalog import pick
from harness.verify.plugins import resolve_impl
from harness.verify.run import resolve_fixtures, verify

ALL_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def refs():
    return {}  # HF references per (fixture, scenario), shared by the tests of this module


# Every built-in on the full matrix of every fixture is `make verify`, which CI runs after `make test`; here tiled, the
# one whose forward is furthest from the textbook's algebra (triton's: tests/test_triton.py)
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["tiled"])
def test_builtin_passes_full_matrix(impl, refs):
    rows, verdicts = verify(resolve_fixtures(None), [resolve_impl(impl)], ALL_DTYPES, quick=False, cache=refs, **QUIET)
    failed = [(r.fixture, r.scenario, r.dtype, r.c.max_abs_err) for r in rows if not r.passed]
    assert not failed, failed
    assert {r.fixture for r in rows} >= {"smollm2-135m", "llama-3.2-1b-synthetic"}
    scen = {r.scenario for r in rows if r.impl == impl}
    assert {"one_token", "len_257", "left_padding", "sparse_positions", "scaled_x50", "bfloat16", "float16"} <= scen
    assert all(v.passed and v.stage is None and not v.imprecise for v in verdicts)  # --strict would pass it too
    assert not [r for r in rows if r.c.imprecise]


# a bug of the catalog per stage, and a fixture it shows on (the whole catalog runs in tests/test_mutants.py)
STAGE_EXAMPLES = {
    "scale_missing": "smollm2-135m",
    "causal_missing": "smollm2-135m",
    "gqa_repeat": "smollm2-135m",
    "rope_interleaved": "smollm2-135m",
    "llama3_missing": "llama-3.2-1b-synthetic",
    "padding_ignored": "smollm2-135m",
    "masked_rows_nan": "smollm2-135m",
    "o_proj_transposed": "smollm2-135m",
}


# what the hint must say for each: the mistake in the user's terms (the diagnosis's words for it)
HINT_SAYS = {
    "scale_missing": "is the 1/sqrt(head_dim) scale missing?",
    "causal_missing": "the causal mask is missing",
    "gqa_repeat": "`repeat_interleave`",
    "rope_interleaved": "RoPE pairs look interleaved",
    "llama3_missing": "the llama3 RoPE scaling (factor 32) is missing",
    "padding_ignored": "padded keys are attended to",
    "masked_rows_nan": "a fully masked row must give zeros",
    "o_proj_transposed": "the output projection looks transposed",
}


@pytest.mark.parametrize("name", [n if STAGE_EXAMPLES[n] == "smollm2-135m" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(STAGE_EXAMPLES)])  # fmt: skip
def test_broken_implementation_names_its_stage(name, refs):
    bug = pick(name)
    rows, verdicts = verify(resolve_fixtures([STAGE_EXAMPLES[name]]), [(name, bug.layer())], ALL_DTYPES, quick=True,
                            cache=refs, **QUIET)  # fmt: skip
    assert any(not r.passed for r in rows if r.impl == name)
    (v,) = verdicts
    assert not v.passed and v.stage == bug.stage, v
    assert HINT_SAYS[name] in v.hint, v.hint


CORRECT_PLUGIN = """
import torch, torch.nn.functional as F

def attention(x, weights, *, config, position_ids, attention_mask=None):
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["head_dim"]; B, S, _ = x.shape
    theta = config["rope_parameters"]["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    ang = position_ids[..., None].float() * inv
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    def rot(t):
        a, b = t.chunk(2, -1)
        return t * cos + torch.cat([-b, a], -1) * sin
    q = rot((x @ weights["q_proj"].T).view(B, S, H, d).transpose(1, 2))
    k = rot((x @ weights["k_proj"].T).view(B, S, Hkv, d).transpose(1, 2)).repeat_interleave(H // Hkv, 1)
    v = (x @ weights["v_proj"].T).view(B, S, Hkv, d).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    s = (q @ k.transpose(-2, -1)).float() / d ** 0.5
    p = torch.softmax(s.masked_fill(~allowed, -1e30), -1) * allowed.any(-1, keepdim=True)
    return ((p.to(v.dtype) @ v).transpose(1, 2).reshape(B, S, H * d)) @ weights["o_proj"].T

def no_scale(x, weights, *, config, position_ids, attention_mask=None):
    config = dict(config, head_dim=config["head_dim"])
    H, d = config["num_attention_heads"], config["head_dim"]
    global_scale = d ** 0.5
    w = dict(weights, q_proj=weights["q_proj"] * global_scale)   # the same as dropping 1/sqrt(d)
    return attention(x, w, config=config, position_ids=position_ids, attention_mask=attention_mask)
"""


@pytest.mark.slow
def test_the_readme_example_layer(tmp_path):
    """The README's first screen: docs/examples/layer.py passes as written, and without its scale fails at stage
    scale with the hint shown there."""
    out = tmp_path / "r.json"
    good, bad = "docs/examples/layer.py:attention", "docs/examples/layer.py:no_scale"
    p = run(["-m", "harness", "verify", "--fixture", "smollm2-135m", "--impl", good, bad, "--quick",
             "--json", str(out)])  # fmt: skip
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr
    v = {x["impl"]: x for x in json.loads(out.read_text())["verdicts"]}
    assert v[good]["passed"] is True and v[good]["stage"] is None
    assert (v[bad]["passed"], v[bad]["stage"]) == (False, "scale")
    assert "scores look scaled by 8.0x: is the 1/sqrt(head_dim) scale missing?" in v[bad]["hint"]


@pytest.mark.slow
def test_external_plugin_module_and_file(tmp_path):
    """A user's module on PYTHONPATH and the same file by path pass; a broken function of that module fails with its
    stage; one run of a real interpreter (the command line as a user runs it)."""
    (tmp_path / "my_attention.py").write_text(textwrap.dedent(CORRECT_PLUGIN))
    env = {"PYTHONPATH": f"{tmp_path}:{FIXTURES.parent}"}
    out = tmp_path / "r.json"
    good = ["my_attention:attention", f"{tmp_path / 'my_attention.py'}:attention"]
    p = run(["-m", "harness", "verify", "--fixture", "smollm2-135m", "--impl", *good, "--impl", "my_attention:no_scale",
             "--quick", "--json", str(out)], env=env)  # fmt: skip
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr
    doc = json.loads(out.read_text())
    v = {x["impl"]: x for x in doc["verdicts"]}
    assert v.keys() == {*good, "my_attention:no_scale"}
    for spec in good:
        assert v[spec]["passed"] is True and v[spec]["stage"] is None
        assert all(r["passed"] for r in doc["results"] if r["impl"] == spec)
    bad = v["my_attention:no_scale"]
    assert bad["stage"] == "scale" and "8.0x" in bad["hint"] and bad["passed"] is False
    assert "FAIL smollm2-135m / my_attention:no_scale: stage scale" in p.stdout
    assert "FAIL smollm2-135m / my_attention:attention" not in p.stdout
    for r in doc["results"]:
        assert {"fixture", "impl", "scenario", "dtype", "passed", "max_abs_err", "tolerance"} <= set(r)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--impl", "nope"], "unknown implementation"),
        pytest.param(["--impl", "no_such_module_xyz:f"], "cannot import", marks=pytest.mark.slow),  # a worker each
        (["--fixture", "no-such-fixture"], "no fixture"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, match):
    p = run(["-m", "harness", "verify", "--quick", *args])
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    assert match in one_line_error(p)


def test_tampered_fixture_exit_2(tmp_path):
    d = tmp_path / "t"
    shutil.copytree(FIXTURES / "smollm2-135m", d)
    (d / "config.json").write_text((d / "config.json").read_text() + " ")
    p = run(["-m", "harness", "verify", "--fixture", str(d), "--quick"])
    assert p.returncode == 2 and "sha256" in one_line_error(p)


@pytest.mark.slow
def test_deterministic_json(tmp_path):
    outs = []
    for i in range(2):
        p = run(
            [
                "-m",
                "harness",
                "verify",
                "--fixture",
                "smollm2-135m",
                "--impl",
                "tiled",
                "--quick",
                "--json",
                str(tmp_path / f"{i}.json"),
            ]
        )
        assert p.returncode == 0, p.stderr
        doc = json.loads((tmp_path / f"{i}.json").read_text())
        doc["summary"].pop("seconds")
        for r in doc["results"]:
            r.pop("seconds")
        outs.append(doc)
    assert outs[0] == outs[1]


def test_list_json():
    p = run(["-m", "harness", "list", "--json"])
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    names = {f["name"]: f for f in doc["fixtures"]}
    assert names["smollm2-135m"]["synthetic"] is False and names["llama-3.2-1b-synthetic"]["synthetic"] is True
    assert set(doc["implementations"]) >= {"naive", "loop", "tiled", "sdpa"}
    assert {"one_token", "sparse_positions", "left_padding"} <= {s["name"] for s in doc["scenarios"]}
