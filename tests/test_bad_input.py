"""Bad input and faults: every path ends in one line and exit 2 (no traceback), and nothing on disk is lost.

- property tests (hypothesis): every field of config.json, manifest.json and Meta's params.json mutated to a wrong
  type, missing, negative, huge or NaN, for `fixture`, `verify`, `list`, `extract`: exit 2 with one line (`list`
  reports the broken fixture and goes on);
- the examples found by hand: GGUF headers that lie, sizes that cannot be allocated, empty prompts, tiny
  contexts, manifests naming paths outside their folder, symlinks and special files, output paths that are not
  files, a reference that is itself NaN, weights changed and re-hashed;
- crash safety: extraction killed (SIGKILL, through the writer's hook) at every point of a replacement leaves the
  complete old fixture or the complete new one, and the next run removes what the killed one left; two writers to
  one --out: one writes, the other exits 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, one_line_error, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from harness.checkpoints import format as fx
from harness.checkpoints.extract import extract
from harness.common import UserError
from harness.versions import installed

SMALL_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "num_hidden_layers": 1, "vocab_size": 300, "intermediate_size": 32,
                "max_position_embeddings": 4096, "rope_theta": 10000.0}  # fmt: skip
QUIET = {"log": lambda *_: None}
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small synthetic fixture (and its config file) to break."""
    d = tmp_path_factory.mktemp("small")
    cfg = d / "config.json"
    cfg.write_text(json.dumps(SMALL_CONFIG))
    return extract(layer=0, out=d / "fx", config_path=cfg, synthetic=True, **QUIET), cfg


def reseal(d, fn="config.json"):
    """manifest.json's sha256 updated for a file changed on purpose, so only the check under test fires."""
    m = json.loads((d / "manifest.json").read_text())
    m["files"][fn] = fx.sha256_file(d / fn)
    (d / "manifest.json").write_text(json.dumps(m))


def exit_2(args) -> str:
    p = run(args)
    assert p.returncode == 2, (args, p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    return one_line_error(p)


# values a careless or hostile edit puts in a field; every one is wrong for every field below
WRONG = st.one_of(
    st.just("missing"), st.text(max_size=4), st.booleans(), st.none(), st.floats(allow_nan=True),
    st.integers(max_value=0), st.integers(min_value=10**12), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)  # fmt: skip
CONFIG_FIELDS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_parameters",
                 "rope_parameters.rope_theta", "rope_parameters.rope_type"]  # fmt: skip
# the fields transformers' LlamaConfig reads besides the shapes: each wrong type was reported OK by `fixture`, then a
# traceback inside LlamaConfig (or a bias-free layer verified against a config with bias)
TYPED_FIELDS = ["rms_norm_eps", "attention_bias", "attention_dropout", "max_position_embeddings",
                "tie_word_embeddings", "rope_parameters.truncate"]  # fmt: skip


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


VALID = {  # the values of WRONG that are right for a typed field ("missing": transformers' default applies)
    "rms_norm_eps": lambda v: isinstance(v, float) and math.isfinite(v) and v > 0,
    "attention_bias": lambda v: v is False,
    "attention_dropout": lambda v: v is None or (_finite(v) and 0 <= v < 1),
    "max_position_embeddings": lambda v: False,
    "tie_word_embeddings": lambda v: isinstance(v, bool),
    "rope_parameters.truncate": lambda v: isinstance(v, bool),
}


def mutate(doc: dict, field: str, value) -> dict:
    doc = json.loads(json.dumps(doc))
    *path, last = field.split(".")
    target = doc
    for key in path:
        target = target[key]
    if value == "missing":
        target.pop(last, None)
    elif not (field == "head_dim" and value is None):  # head_dim null means "derive it": the one valid null
        target[last] = value
    return doc


OPTIONAL = {"num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings"}  # HF's defaults apply


def wrong_for(field: str, value, source: bool = False) -> bool:
    """Exclude the few generated values that happen to be valid for this field."""
    if source and field in OPTIONAL and value in (None, "missing"):
        return False
    if field in VALID:
        return not (isinstance(value, str) and value == "missing") and not VALID[field](value)
    if field == "rope_parameters.rope_type":
        return value not in ("default", "linear", "dynamic", "llama3", "yarn") and value != "missing"
    if field == "head_dim" and (value is None or value == "missing"):
        return False
    if field.endswith("rope_theta") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return not (math.isfinite(value) and value > 0)
    return True


@SETTINGS
@given(field=st.sampled_from(CONFIG_FIELDS + TYPED_FIELDS), value=WRONG,
       command=st.sampled_from(["fixture", "verify", "list"]))  # fmt: skip
def test_fixture_config_fields(small, tmp_path_factory, field, value, command):
    if not wrong_for(field, value):
        return
    src, _ = small
    root = tmp_path_factory.mktemp("c")
    d = root / "fx"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(mutate(cfg, field, value)))
    reseal(d)
    if command == "list":  # a broken fixture is listed as broken and the listing goes on
        os.environ["ATTN_FIXTURES"] = str(root)
        try:
            from harness import common

            old, common.FIXTURES_DIR = common.FIXTURES_DIR, root
            p = run(["-m", "harness", "list", "--json"])
        finally:
            common.FIXTURES_DIR = old
            del os.environ["ATTN_FIXTURES"]
        assert p.returncode == 0, p.stderr
        (entry,) = json.loads(p.stdout)["fixtures"]
        assert "config.json" in entry["broken"]
        return
    args = ["-m", "harness", command, str(d)] if command == "fixture" else \
        ["-m", "harness", "verify", "--fixture", str(d), "--impl", "naive", "--quick"]  # fmt: skip
    line = exit_2(args)
    assert "config.json" in line
    if field in TYPED_FIELDS and not (isinstance(value, float) and not math.isfinite(value)):  # (NaN: not JSON)
        assert f"'{field.split('.')[-1]}'" in line, line  # the field and the value, not a guess at the cause
        assert repr(value) in line or json.dumps(value) in line, line


@SETTINGS
@given(field=st.sampled_from(CONFIG_FIELDS[:4] + ["rope_theta", "max_position_embeddings", "num_hidden_layers",
                                                 "vocab_size"] + TYPED_FIELDS[:3]), value=WRONG)  # fmt: skip
def test_extract_config_fields(small, tmp_path_factory, field, value):
    if not wrong_for(field, value, source=True):
        return
    _, cfg = small
    d = tmp_path_factory.mktemp("e")
    bad = d / "config.json"
    bad.write_text(json.dumps(mutate(json.loads(cfg.read_text()), field, value)))
    line = exit_2(["scripts/extract.py", "--synthetic", "--config", str(bad), "--out", str(d / "out")])
    assert str(bad) in line
    assert not (d / "out").exists()


MANIFEST_VALUES = st.one_of(
    WRONG,
    st.just({"config.json": "0" * 64, "../../etc/passwd": "0" * 64}),
    st.just({"config.json": "0" * 64, "/proc/self/mem": "0" * 64}),
    st.just({"config.json": "not a digest"}),
    st.just({"config.json": "0" * 64, ".hidden": "0" * 64}),
)


@SETTINGS
@given(field=st.sampled_from(["files", "layer"]), value=MANIFEST_VALUES, command=st.sampled_from(["fixture", "verify"]))
def test_manifest_fields(small, tmp_path_factory, field, value, command):
    if field == "layer" and value == 0:
        return
    src, _ = small
    d = tmp_path_factory.mktemp("m") / "fx"
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(mutate(m, field, value)))
    args = ["-m", "harness", "fixture", str(d)] if command == "fixture" else \
        ["-m", "harness", "verify", "--fixture", str(d), "--impl", "naive", "--quick"]  # fmt: skip
    exit_2(args)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    from checkpoints import hf_to_meta, make_hf_checkpoint

    root = tmp_path_factory.mktemp("meta")
    hf = make_hf_checkpoint(root / "hf", num_layers=1, vocab_size=300, dtype=torch.float32,
                            config_overrides={"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                              "intermediate_size": 64, "rope_scaling": None})  # fmt: skip
    return hf_to_meta(hf, root / "meta")


@SETTINGS
@given(field=st.sampled_from(["dim", "n_heads", "n_layers", "n_kv_heads", "rope_theta"]), value=WRONG)
def test_meta_params_fields(meta_dir, tmp_path_factory, field, value):
    if field in ("n_kv_heads", "rope_theta") and value in (None, "missing"):
        return  # optional: their defaults apply
    if not wrong_for("rope_theta" if field == "rope_theta" else field, value):
        return
    d = tmp_path_factory.mktemp("p") / "meta"
    shutil.copytree(meta_dir, d)
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps(mutate(params, field, value)))
    assert "params.json" in exit_2(["scripts/extract.py", "--source", str(d), "--out", str(d.parent / "out")])


# ---------------------------------------------------------------------------------------------------------
# the examples found by hand


def test_gguf_header_claiming_2_62_tensors(tmp_path):
    f = tmp_path / "lies.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0) + b"\0" * 64)
    assert "claims" in exit_2(["scripts/extract.py", "--source", str(f), "--out", str(tmp_path / "x")])
    f.write_bytes(b"GGUF" + struct.pack("<I", 3))  # truncated header
    exit_2(["scripts/extract.py", "--source", str(f), "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("change, needle", [
    ({"hidden_size": 10**9 // 64 * 64, "head_dim": 64, "num_attention_heads": 16, "num_key_value_heads": 16},
     "larger than any model"),
    ({"hidden_size": 1 << 20, "head_dim": 1 << 16, "num_attention_heads": 16, "num_key_value_heads": 16},
     "GiB"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"num_attention_heads": 0}, "positive integer"),
    ({"hidden_size": -64}, "positive integer"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_scaling": {"rope_type": "nope"}}, "rope_type"),
])  # fmt: skip
def test_synthetic_config_that_cannot_be_built(tmp_path, change, needle):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SMALL_CONFIG | change))
    assert needle in exit_2(["scripts/extract.py", "--synthetic", "--config", str(cfg), "--out", str(tmp_path / "x")])


def test_tiny_context_and_empty_prompt(tmp_path, small):
    _, cfg = small
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(SMALL_CONFIG | {"max_position_embeddings": 10}))
    fxd = extract(layer=0, out=tmp_path / "tiny", config_path=tiny, synthetic=True, **QUIET)
    p = run(["-m", "harness", "verify", "--fixture", str(fxd), "--impl", "naive", "--quick"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr  # positions past a 10-token context still verify
    d = tmp_path / "empty"
    shutil.copytree(fxd, d)
    inputs = load_file(d / "inputs.safetensors")
    save_file({k: v[:, :0].contiguous() for k, v in inputs.items()}, d / "inputs.safetensors")
    reseal(d, "inputs.safetensors")
    assert "no tokens" in exit_2(["-m", "harness", "fixture", str(d)])


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_manifest_names_no_special_files(tmp_path, small, kind):
    src, _ = small
    d = tmp_path / "fx"
    shutil.copytree(src, d)
    target = d / "inputs.safetensors"
    target.unlink()
    if kind == "symlink":
        target.symlink_to(src / "inputs.safetensors")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    assert "regular file" in exit_2(["-m", "harness", "fixture", str(d)])


@pytest.mark.parametrize("where", ["directory", "under_a_file", "symlink", "fifo"])
def test_output_paths_are_checked_before_the_run(tmp_path, where):
    target = {"directory": tmp_path, "under_a_file": tmp_path / "f" / "out.json", "symlink": tmp_path / "link.json",
              "fifo": tmp_path / "fifo.json"}[where]  # fmt: skip
    (tmp_path / "f").write_text("a file")
    (tmp_path / "link.json").symlink_to(tmp_path / "elsewhere.json")
    os.mkfifo(tmp_path / "fifo.json")
    for cmd in (["-m", "harness", "verify", "--impl", "naive", "--quick"], ["-m", "harness", "mutants"]):
        p = run([*cmd, "--json", str(target)])
        assert p.returncode == 2 and "--json" in one_line_error(p)
        assert "passed" not in p.stdout  # refused before any work
    assert not (tmp_path / "elsewhere.json").exists() and (tmp_path / "fifo.json").is_fifo()


def test_a_reference_that_is_nan_is_a_fixture_problem(tmp_path, small):
    src, _ = small
    d = tmp_path / "fx"
    shutil.copytree(src, d)
    w = load_file(d / "attn_layer_0.safetensors")
    w["q_proj"] = w["q_proj"] * 3e38  # finite weights whose scores overflow to inf: HF's own output is NaN
    save_file(w, d / "attn_layer_0.safetensors")
    reseal(d, "attn_layer_0.safetensors")
    line = exit_2(["-m", "harness", "verify", "--fixture", str(d), "--impl", "naive", "--quick"])
    assert "NaN/Inf" in line and "transformers' own output" in line


def tampered_copy(tmp_path, made_with: str):
    """The SmolLM2 fixture with v_proj changed and re-hashed, its manifest naming `made_with` as the transformers that
    wrote it: what a careless edit leaves under the installed transformers, or a new release's drift under another."""
    d = tmp_path / "fx"
    shutil.copytree(FIXTURES / "smollm2-135m", d)
    w = load_file(d / "attn_layer_0.safetensors")
    w["v_proj"] = w["v_proj"] * 1.01
    save_file(w, d / "attn_layer_0.safetensors")
    reseal(d, "attn_layer_0.safetensors")
    m = json.loads((d / "manifest.json").read_text())
    m["versions"]["transformers"] = made_with
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_weights_changed_and_rehashed_are_not_called_drift(tmp_path):
    """The transformers that wrote the golden is the one installed, and disagrees with it: the fixture changed."""
    d = tampered_copy(tmp_path, installed(("transformers",))["transformers"])
    line = exit_2(["-m", "harness", "verify", "--fixture", str(d), "--impl", "naive", "--quick"])
    assert "changed after extraction" in line


def test_a_golden_from_another_transformers_that_disagrees_is_drift(tmp_path):
    """The same disagreement under another transformers than the one that wrote the golden: the reference moved. One
    line above the table says so, the JSON lists it under "reference_drift"; it is no failure (exit 0 with a correct
    implementation), and the implementation is still judged against the installed transformers and passes."""
    d = tampered_copy(tmp_path, "0.0.1")
    p = run(["-m", "harness", "verify", "--fixture", str(d), "--impl", "naive", "--quick", "--dtype", "float32",
             "--json", str(tmp_path / "v.json")])  # fmt: skip
    assert p.returncode == 0, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    have = installed(("transformers",))["transformers"]
    lines = p.stdout.splitlines()
    drift = [ln for ln in lines if ln.startswith("the reference moved: ")]
    assert len(drift) == 1 and lines.index(drift[0]) < next(i for i, ln in enumerate(lines) if ln.startswith("fixture"))
    assert f"transformers 0.0.1 -> {have} changed LlamaAttention's output by " in drift[0]
    assert " on fx/prompt" in drift[0]
    doc = json.loads((tmp_path / "v.json").read_text())
    golden = [r for r in doc["results"] if r["impl"] == "golden"]
    assert len(golden) == 1 and not golden[0]["passed"] and golden[0]["drift"] and golden[0]["max_abs_err"] > 1e-3
    (moved,) = doc["reference_drift"]
    assert moved["fixture"] == "fx" and moved["scenario"] == "prompt"
    assert moved["made_with"]["transformers"] == "0.0.1" and moved["installed"]["transformers"] == have
    assert moved["max_abs_err"] == golden[0]["max_abs_err"] and moved["tolerance"] == golden[0]["tolerance"]
    assert doc["summary"]["drift"] == 1 and doc["summary"]["failed"] == 0
    assert [v["passed"] for v in doc["verdicts"]] == [True]
    assert all(r["passed"] for r in doc["results"] if r["impl"] != "golden")


@pytest.mark.slow  # three verify runs
def test_accept_reference_rewrites_the_drifted_golden(tmp_path):
    """--accept-reference on a copy: the golden, its sha256 and the manifest's versions rewritten with the installed
    transformers' output (one line), the rest of the fixture as it was; a second run reports no drift."""
    d = tampered_copy(tmp_path, "0.0.1")
    before = json.loads((d / "manifest.json").read_text())
    args = ["-m", "harness", "verify", "--fixture", str(d), "--impl", "naive", "--quick", "--dtype", "float32"]
    p = run([*args, "--accept-reference"])
    assert p.returncode == 0, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    have = installed(("transformers",))["transformers"]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("accepted the reference: ")]
    assert str(d) in line and f"transformers {have}" in line and "0.0.1" in line
    after = json.loads((d / "manifest.json").read_text())
    assert after["versions"]["transformers"] == have
    assert after["files"]["inputs.safetensors"] == fx.sha256_file(d / "inputs.safetensors")
    assert after["files"]["inputs.safetensors"] != before["files"]["inputs.safetensors"]
    assert {k: v for k, v in after["files"].items() if k != "inputs.safetensors"} == {
        k: v for k, v in before["files"].items() if k != "inputs.safetensors"}  # fmt: skip
    new = load_file(d / "inputs.safetensors")
    old = load_file(FIXTURES / "smollm2-135m" / "inputs.safetensors")
    assert torch.equal(new["hidden_states"], old["hidden_states"]) and not torch.equal(new["golden"], old["golden"])
    p = run([*args, "--json", str(tmp_path / "v.json")])
    assert p.returncode == 0 and "the reference moved" not in p.stdout, p.stdout[-1500:]
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["reference_drift"] == [] and all(r["passed"] for r in doc["results"])


# ---------------------------------------------------------------------------------------------------------
# crash safety


# every point of the writer (harness.checkpoints.format.hook): the lock taken, the temporary folder made, the weights
# written, just before the atomic exchange, just after it, after the old copy is removed
KILL_POINTS = ["locked", "tmp_created", "wrote:attn_layer_0.safetensors", "before_publish", "after_publish",
               "cleaned"]  # fmt: skip


@pytest.mark.gate  # kills extractions at many points: out of make test's budget
def test_a_killed_extraction_leaves_the_old_or_the_new_fixture(tmp_path, small):
    """At each point an extraction over an existing fixture is killed (SIGKILL, nothing runs after it): the fixture
    is complete, the old one before the exchange and the new one after; the next run cleans up what was left. The
    six extractions (fresh interpreters, each killed at its point) run side by side."""
    _, cfg = small
    procs = {}
    for point in KILL_POINTS:
        out = tmp_path / point.replace(":", "_") / "fx"
        old = extract(layer=0, out=out, config_path=cfg, synthetic=True, seed=1, **QUIET)
        args = ["scripts/extract.py", "--synthetic", "--config", str(cfg), "--seed", "2", "--out", str(out), "--force"]
        env = {**os.environ, "ATTN_KILL_AT": point, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        procs[point] = (out, fx.load_fixture(old).manifest["files"], proc)
    for point, (out, old_files, proc) in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == -9, (point, proc.returncode, err[-1000:])
        files = fx.load_fixture(out).manifest["files"]  # complete, whichever it is
        new = point in ("after_publish", "cleaned")
        assert (files != old_files) == new, point
        extract(layer=0, out=out, config_path=cfg, synthetic=True, seed=2, force=True, **QUIET)  # cleans up
        assert not list(out.parent.glob(".fx.tmp-*")) and not list(out.parent.glob(".fx.old-*")), point
        assert not (out.parent / ".fx.lock").exists(), point  # the killed run's lock file too
        assert fx.load_fixture(out).manifest["files"] != old_files


def test_two_writers_to_one_out(tmp_path, small):
    _, cfg = small
    out = tmp_path / "fx"
    with fx.fixture_lock(out):  # a writer holding the lock (an open file description of its own)
        fd = os.open(tmp_path / ".fx.lock", os.O_RDWR)
        import fcntl

        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    other = tmp_path / "held"
    import fcntl

    fd = os.open(tmp_path / ".held.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's lock, as the kernel sees it
    try:
        line = exit_2(["scripts/extract.py", "--synthetic", "--config", str(cfg), "--out", str(other)])
        assert "another extraction" in line
        with pytest.raises(UserError, match="another extraction"):
            extract(layer=0, out=other, config_path=cfg, synthetic=True, **QUIET)
    finally:
        os.close(fd)
    assert fx.load_fixture(extract(layer=0, out=other, config_path=cfg, synthetic=True, **QUIET))
