"""Fixture validation covers types: every config field the harness (and transformers' LlamaConfig under it) reads,
the dtypes of weights and inputs, and files that cannot be read or must not be opened. Each case is one line on
stderr naming the file, the field, the value and the fix, exit 2, from `fixture` (which used to report several of
them OK) and from `verify` (which then crashed in LlamaConfig or blamed transformers)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time

import pytest
import torch
from conftest import FIXTURES, one_line_error, run
from safetensors.torch import load_file, save_file

from harness.checkpoints import format as fx
from harness.checkpoints import validate

FIX = "fix the config or re-extract the fixture"


def copy_fixture(tmp_path):
    d = tmp_path / "fx"
    shutil.copytree(FIXTURES / "smollm2-135m", d)
    return d


def reseal(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    m["files"][fn] = fx.sha256_file(d / fn)
    (d / "manifest.json").write_text(json.dumps(m))


def edit_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    for key, value in fields.items():
        *path, last = key.split("__")
        target = cfg
        for k in path:
            target = target[k]
        target[last] = value
    (d / "config.json").write_text(json.dumps(cfg))
    reseal(d, "config.json")


def fixture_error(d) -> str:
    p = run(["-m", "harness", "fixture", str(d)])
    assert p.returncode == 2, (p.returncode, p.stdout[-800:], p.stderr[-800:])
    return one_line_error(p)


# (field, value, what the line must also say); __ separates nested keys
CONFIG_CASES = [
    ("rms_norm_eps", "tiny", "positive finite float"),
    ("rms_norm_eps", 0.0, "positive finite float"),
    ("rms_norm_eps", None, "positive finite float"),
    ("rms_norm_eps", 1, "float"),  # LlamaConfig types it float: an int is a traceback there
    ("attention_bias", True, "no bias tensors"),
    ("attention_bias", "false", "JSON boolean"),
    ("tie_word_embeddings", "true", "JSON boolean"),
    ("mlp_bias", 0, "JSON boolean"),
    ("use_cache", "yes", "JSON boolean"),
    ("attention_dropout", 2.0, "[0, 1)"),
    ("attention_dropout", "x", "[0, 1)"),
    ("hidden_act", 3, "activation"),
    ("pretraining_tp", "x", "positive integer"),
    ("initializer_range", -0.5, "float >= 0"),
    ("eos_token_id", "2", "integer"),
    ("dtype", "int8", "float32"),
    ("max_position_embeddings", None, "positive integer"),
    ("max_position_embeddings", 0, "positive integer"),
    ("max_position_embeddings", 1.5, "positive integer"),
    ("max_position_embeddings", "4096", "positive integer"),
    ("num_attention_heads", -9, "positive integer"),
    ("num_key_value_heads", 0, "positive integer"),
    ("num_key_value_heads", 2, "not a multiple"),  # 9 query heads
    ("head_dim", "64", "positive integer"),
    ("head_dim", 63, "even"),
    ("vocab_size", None, "positive integer"),
    ("rope_parameters__rope_theta", -1.0, "positive finite"),
    ("rope_parameters__rope_theta", "1e4", "positive finite"),
    ("rope_parameters__rope_theta", True, "positive finite"),
    ("rope_parameters__truncate", "no", "JSON boolean"),
    ("rope_parameters__partial_rotary_factor", 1.5, "(0, 1]"),
    ("rope_parameters__partial_rotary_factor", 0.01, "rotary dimension"),  # 64 * 0.01 -> 0 rotating channels
    ("rope_parameters", [1, 2], "rope_parameters"),
]


@pytest.mark.parametrize("field, value, says", CONFIG_CASES, ids=[f"{f}={v!r}" for f, v, _ in CONFIG_CASES])
def test_config_field_types_and_ranges(tmp_path, field, value, says):
    d = copy_fixture(tmp_path)
    edit_config(d, **{field: value})
    line = fixture_error(d)
    name = field.split("__")[-1]
    assert str(d / "config.json") in line and says in line, line
    if field != "rope_parameters" and says not in ("not a multiple", "even", "rotary dimension"):
        assert f"'{name}'" in line and (repr(value) in line or json.dumps(value) in line), line  # field, value
    assert "fix" in line or "use a checkpoint" in line  # and the fix


@pytest.mark.parametrize("field, value", [("rms_norm_eps", "tiny"), ("attention_bias", True),
                                          ("tie_word_embeddings", "true")])  # fmt: skip
def test_verify_refuses_them_before_any_work(tmp_path, field, value):
    """verify used to crash inside LlamaConfig on these (or verify a bias-free layer against a config with bias)."""
    d = copy_fixture(tmp_path)
    edit_config(d, **{field: value})
    p = run(["-m", "harness", "verify", "--fixture", str(d), "--impl", "naive", "--quick"])
    assert p.returncode == 2 and f"'{field}'" in one_line_error(p), p.stderr[-1500:]
    assert "transformers" not in one_line_error(p)  # never blamed on the transformers version


def test_reference_inv_freq_backstop_is_one_line():
    """What check_config does not know about and transformers' LlamaConfig refuses is one line too."""
    cfg = json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text()) | {"num_labels": "x"}
    with pytest.raises(fx.UserError, match="where.json: transformers' LlamaConfig rejects it"):
        fx.reference_inv_freq(cfg, "where.json")


# ---------------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2,
                                   torch.complex64])  # fmt: skip
def test_weights_of_an_unsupported_dtype(tmp_path, dtype):
    d = copy_fixture(tmp_path)
    fn = d / "attn_layer_0.safetensors"
    t = load_file(fn)
    t["k_proj"] = t["k_proj"].to(dtype)
    save_file(t, fn)
    reseal(d, fn.name)
    line = fixture_error(d)
    assert str(fn) in line and "'k_proj'" in line and str(dtype).removeprefix("torch.") in line, line
    assert "float32, float16, bfloat16, float64" in line and "re-extract" in line


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_of_a_supported_dtype_load(tmp_path, dtype):
    d = copy_fixture(tmp_path)
    fn = d / "attn_layer_0.safetensors"
    t = load_file(fn)
    t["o_proj"] = t["o_proj"].to(dtype)
    save_file(t, fn)
    reseal(d, fn.name)
    assert fx.load_fixture(d).weights["o_proj"].dtype == dtype


def test_source_weights_of_an_unsupported_dtype():
    cfg = json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text())
    w = fx.load_fixture("smollm2-135m").weights
    with pytest.raises(fx.UserError, match="'q_proj' has dtype int8.*quantized"):
        fx.check_weights(cfg, 0, w | {"q_proj": w["q_proj"].to(torch.int8)})


@pytest.mark.parametrize("key, dtype, says", [
    ("hidden_states", torch.int32, "'hidden_states' has dtype int32"),
    ("golden", torch.bool, "'golden' has dtype bool"),
    ("golden", torch.complex64, "'golden' has dtype complex64"),
    ("token_ids", torch.float32, "'token_ids' has dtype float32; token ids are an integer dtype"),
    ("token_ids", torch.bool, "'token_ids' has dtype bool"),
])  # fmt: skip
def test_inputs_of_the_wrong_dtype(tmp_path, key, dtype, says):
    d = copy_fixture(tmp_path)
    fn = d / "inputs.safetensors"
    t = load_file(fn)
    t[key] = t[key].to(dtype)
    save_file(t, fn)
    reseal(d, fn.name)
    line = fixture_error(d)
    assert str(fn) in line and says in line and "re-extract" in line, line


def test_negative_token_ids(tmp_path):
    d = copy_fixture(tmp_path)
    fn = d / "inputs.safetensors"
    t = load_file(fn)
    t["token_ids"][0, 3] = -5
    save_file(t, fn)
    reseal(d, fn.name)
    assert "negative id (-5)" in fixture_error(d)


# ---------------------------------------------------------------------------------------------------------
# files that cannot be read, or must not be opened


def _refusing(real, suffix: str, err: int):
    def fake(path, *a, **k):
        if str(path).endswith(suffix):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, *a, **k)

    return fake


@pytest.mark.parametrize("err", [errno.EACCES, errno.EIO])
def test_unreadable_fixture_config(tmp_path, monkeypatch, err):
    """A config.json this process may not read (the tests run as root, where chmod 000 reads fine: the open fails
    here as it would for another user)."""
    d = copy_fixture(tmp_path)
    monkeypatch.setattr(validate.os, "open", _refusing(os.open, "config.json", err))
    line = fixture_error(d)
    assert str(d / "config.json") in line and f"cannot read it ({os.strerror(err)})" in line


def test_unreadable_fixture_file_while_hashing(tmp_path, monkeypatch):
    d = copy_fixture(tmp_path)
    monkeypatch.setattr(fx, "open", _refusing(open, "attn_layer_0.safetensors", errno.EACCES), raising=False)
    line = fixture_error(d)
    assert str(d / "attn_layer_0.safetensors") in line and "cannot read it (Permission denied)" in line


def test_fixture_config_that_is_a_directory(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    assert "regular file" in fixture_error(d)


class Watchdog:
    """Opens `fifo` for writing after `after` seconds, which frees a reader stuck in open() or read() on it (a test
    of code that hangs then fails instead of hanging the suite); cancelled if the code under test never opens it."""

    def __init__(self, fifo, after: float = 20.0):
        self.fifo, self.fired = fifo, False
        self.timer = threading.Timer(after, self._free)
        self.timer.daemon = True

    def _free(self):
        self.fired = True
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # nobody is reading: nothing to free
            return
        os.write(fd, b"{}")
        os.close(fd)

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def test_extract_config_that_is_a_fifo_is_not_opened(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with Watchdog(fifo) as dog:
        p = run(["scripts/extract.py", "--synthetic", "--config", str(fifo), "--out", str(tmp_path / "out")])
    assert not dog.fired and time.perf_counter() - t0 < 15
    assert p.returncode == 2 and "is a FIFO (named pipe), not a regular file, so it was not opened" in one_line_error(p)
    assert not (tmp_path / "out").exists()


def test_meta_config_that_is_a_fifo_is_not_opened(tmp_path):
    """Meta --config PATH: a FIFO is refused unopened (it used to be 'no such file', or a hang where it was read)."""
    from harness.checkpoints.sources.local import read_config

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with Watchdog(fifo), pytest.raises(fx.UserError, match="FIFO"):
        read_config(fifo)


def test_fixture_config_that_is_a_fifo_is_not_opened(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    with Watchdog(d / "config.json") as dog:
        line = fixture_error(d)
    assert not dog.fired and "regular file" in line


@pytest.mark.parametrize("what", ["directory", "device", "missing"])
def test_extract_config_that_is_not_a_file(tmp_path, what):
    cfg = {"directory": tmp_path, "device": "/dev/null", "missing": tmp_path / "nope.json"}[what]
    p = run(["scripts/extract.py", "--synthetic", "--config", str(cfg), "--out", str(tmp_path / "out")])
    line = one_line_error(p)
    assert p.returncode == 2 and str(cfg) in line
    assert {"directory": "is a directory", "device": "is a device", "missing": "missing"}[what] in line
    assert not (tmp_path / "out").exists()


def test_extract_config_unreadable(tmp_path, monkeypatch):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text())))
    monkeypatch.setattr(validate.os, "open", _refusing(os.open, "config.json", errno.EACCES))
    p = run(["scripts/extract.py", "--synthetic", "--config", str(cfg), "--out", str(tmp_path / "out")])
    assert p.returncode == 2 and "cannot read it (Permission denied)" in one_line_error(p)
