"""hf:REPO against a loopback stand-in for the Hub: range reads only, and every failure is one clear line."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import one_line_error
from hubmock import MockHub

from harness.checkpoints import format as fx
from harness.checkpoints.extract import cli, extract

REPO = "meta-llama/Llama-3.2-1B"
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """Llama-3.2-1B's tensor names and exact attention shapes (2 layers, small vocab, small MLP), bf16."""
    from checkpoints import make_hf_checkpoint

    return make_hf_checkpoint(
        tmp_path_factory.mktemp("hub") / "Llama-3.2-1B", config_overrides={"intermediate_size": 256}
    )


@pytest.fixture
def hub(hf_env, llama_dir, monkeypatch):
    from harness.checkpoints.sources import hub as source

    monkeypatch.setattr(source, "BACKOFF_S", 0.0)  # retries without waits: the mock answers at once
    with MockHub({REPO: llama_dir}, gated={REPO}, lfs_redirect=True) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_TOKEN", h.token)
        yield h


def needed_bytes(llama_dir, ids) -> int:
    """What one layer-0 fixture must read: the 4 projections, the prompt's embedding rows, the layernorm,
    the safetensors header, config.json and the tokenizer files."""
    raw = (llama_dir / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])

    def size(name):
        a, b = header[name]["data_offsets"]
        return b - a

    p = "model.layers.0."
    tensors = sum(size(p + f"self_attn.{x}.weight") for x in fx.WEIGHT_NAMES) + size(p + "input_layernorm.weight")
    V, D = header["model.embed_tokens.weight"]["shape"]
    rows = len(set(ids.reshape(-1).tolist())) * size("model.embed_tokens.weight") // V
    small = sum((llama_dir / f).stat().st_size for f in ("config.json", "tokenizer.json", "tokenizer_config.json"))
    small += sum((llama_dir / f).stat().st_size for f in ("special_tokens_map.json",) if (llama_dir / f).exists())
    return tensors + rows + 8 + n + small


def test_happy_path_reads_only_the_layer(tmp_path, hub, llama_dir):
    out = extract(f"hf:{REPO}", out=tmp_path / "fx", **QUIET)
    f = fx.load_fixture(out)
    need = needed_bytes(llama_dir, f.inputs["token_ids"])
    total = (llama_dir / "model.safetensors").stat().st_size
    assert hub.bytes_served <= 1.05 * need, (hub.bytes_served, need)
    assert hub.bytes_served < total / 2  # never the whole file
    assert f.manifest["bytes_downloaded"] == hub.bytes_served
    assert all(r["range"] for r in hub.requests if r["method"] == "GET" and "model.safetensors" in r["path"])
    src = f.manifest["source"]
    assert src["kind"] == "hf-hub" and src["repo_id"] == REPO and src["commit_sha"] == MockHub.commit(REPO)
    # the same fixture as reading the files locally, bit for bit
    local = extract(str(llama_dir), out=tmp_path / "local", **QUIET)
    for fn in ("attn_layer_0.safetensors", "inputs.safetensors", "config.json"):
        assert fx.sha256_file(out / fn) == fx.sha256_file(local / fn), fn
    # the token is never stored
    assert not any(hub.token.encode() in p.read_bytes() for p in out.iterdir())


@pytest.mark.slow  # keeps make test-fast under its budget
def test_sharded_repo_over_the_hub(tmp_path, hf_env, monkeypatch):
    from checkpoints import make_hf_checkpoint

    d = make_hf_checkpoint(
        tmp_path / "sharded",
        config_overrides={
            "hidden_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
        },
        num_layers=3,
        sharded=True,
    )
    with MockHub({"org/sharded": d}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        out = extract("hf:org/sharded", layer=2, out=tmp_path / "fx", **QUIET)
    local = extract(str(d), layer=2, out=tmp_path / "local", **QUIET)
    for fn in ("attn_layer_2.safetensors", "inputs.safetensors"):
        assert fx.sha256_file(out / fn) == fx.sha256_file(local / fn), fn


def _cli(args, capsys) -> tuple[int, str]:
    rc = cli(args)
    return rc, capsys.readouterr().err


def test_gated_without_token(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    rc, err = _cli(["--source", f"hf:{REPO}", "--out", str(tmp_path / "fx")], capsys)
    assert rc == 2
    line = one_line_error(err)
    assert "gated" in line and "HF_TOKEN" in line and "--source" in line
    assert not (tmp_path / "fx").exists()


def test_wrong_token_is_gated_too(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    rc, err = _cli(["--source", f"hf:{REPO}", "--out", str(tmp_path / "fx")], capsys)
    assert rc == 2 and "gated" in one_line_error(err) and "hf_wrong" not in err


@pytest.mark.parametrize("spec, match", [("hf:nobody/nothing", "not found"), (f"hf:{REPO}@v9", "revision")])
def test_not_found(tmp_path, hub, capsys, spec, match):
    rc, err = _cli(["--source", spec, "--out", str(tmp_path / "fx")], capsys)
    assert rc == 2 and match in one_line_error(err)


def test_missing_weights_file(tmp_path, hf_env, monkeypatch, capsys):
    d = tmp_path / "noweights"
    d.mkdir()
    from checkpoints import LLAMA_3_2_1B_CONFIG

    (d / "config.json").write_text(json.dumps(LLAMA_3_2_1B_CONFIG))
    with MockHub({"org/noweights": d}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        rc, err = _cli(["--source", "hf:org/noweights", "--out", str(tmp_path / "fx")], capsys)
    assert rc == 2
    line = one_line_error(err)
    assert "missing on the Hub" in line and "model.safetensors" in line


@pytest.mark.slow  # seconds of retries and back-off (keeps make test-fast under its budget)
def test_server_error_then_success(tmp_path, hub, llama_dir):
    hub.fail_next("model.safetensors", status=500, times=1)
    out = extract(f"hf:{REPO}", out=tmp_path / "fx", **QUIET)
    assert any(r["status"] == 500 for r in hub.requests)
    local = extract(str(llama_dir), out=tmp_path / "local", **QUIET)
    assert fx.sha256_file(out / "attn_layer_0.safetensors") == fx.sha256_file(local / "attn_layer_0.safetensors")


@pytest.mark.slow  # seconds of retries and back-off (keeps make test-fast under its budget)
def test_truncated_body_is_retried(tmp_path, hub, llama_dir):
    hub.truncate_next("model.safetensors", times=2)
    out = extract(f"hf:{REPO}", out=tmp_path / "fx", **QUIET)
    local = extract(str(llama_dir), out=tmp_path / "local", **QUIET)
    assert fx.sha256_file(out / "attn_layer_0.safetensors") == fx.sha256_file(local / "attn_layer_0.safetensors")


@pytest.mark.slow  # seconds of retries and back-off (keeps make test-fast under its budget)
def test_always_truncated_fails_and_keeps_old_fixture(tmp_path, hub, capsys):
    out = extract(f"hf:{REPO}", out=tmp_path / "fx", **QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    hub.truncate_next("model.safetensors", times=100)
    rc, err = _cli(["--source", f"hf:{REPO}", "--out", str(out)], capsys)
    assert rc == 2 and "failed" in one_line_error(err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("corrupt", ["length", "json"])
def test_corrupt_header(tmp_path, hf_env, monkeypatch, capsys, corrupt):
    from checkpoints import make_hf_checkpoint

    d = make_hf_checkpoint(
        tmp_path / "bad",
        config_overrides={
            "hidden_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
        },
    )
    raw = bytearray((d / "model.safetensors").read_bytes())
    if corrupt == "length":
        raw[:8] = struct.pack("<Q", 1 << 60)
    else:
        raw[8:20] = b"\x00garbage!!\xff\xfe"
    (d / "model.safetensors").write_bytes(bytes(raw))
    with MockHub({"org/bad": d}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        rc, err = _cli(["--source", "hf:org/bad", "--out", str(tmp_path / "fx")], capsys)
    assert rc == 2 and "corrupt safetensors header" in one_line_error(err)


def test_unreachable_endpoint(tmp_path, hf_env, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    rc, err = _cli(["--source", f"hf:{REPO}", "--out", str(tmp_path / "fx")], capsys)
    assert rc == 2 and "cannot reach" in one_line_error(err)


def test_credentials_inside_the_endpoint_url_are_never_printed_or_stored(tmp_path, hub, monkeypatch, capsys):
    """HF_ENDPOINT=https://user:secret@host: the secret reaches neither a line printed nor a file written."""
    secret = "s3cr3t-pa55"
    monkeypatch.setenv("HF_ENDPOINT", hub.url.replace("://", f"://alice:{secret}@"))
    rc = cli(["--source", f"hf:{REPO}", "--out", str(tmp_path / "fx")])
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    if rc == 0:  # the endpoint took the credentials: the manifest keeps the endpoint, without them
        manifest = (tmp_path / "fx" / "manifest.json").read_text()
        assert "alice" not in manifest and secret not in manifest and "127.0.0.1" in manifest
        assert not any(secret.encode() in p.read_bytes() for p in (tmp_path / "fx").iterdir())
    else:
        assert rc == 2 and secret not in one_line_error(printed.err)
    monkeypatch.setenv("HF_ENDPOINT", f"http://alice:{secret}@127.0.0.1:9")  # unreachable: the error line too
    rc, err = _cli(["--source", f"hf:{REPO}", "--out", str(tmp_path / "fy")], capsys)
    assert rc == 2 and "cannot reach" in one_line_error(err) and secret not in err and "127.0.0.1:9" in err


@pytest.mark.parametrize("userinfo", ["alice:pa/ss-SECRET", "alice:p@ss/SECRET?x#y", "SECRET-token-only"])
def test_a_slash_or_at_in_the_endpoint_password(tmp_path, hub, monkeypatch, capsys, userinfo):
    """HF_ENDPOINT=https://user:pa/ss@host: no URL parser reads that '/' as part of the password (the host became
    'alice', the rest a path); the secret is percent-encoded for the request and appears in no line and no file."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url.replace("://", f"://{userinfo}@"))
    rc = cli(["--source", f"hf:{REPO}", "--out", str(tmp_path / "fx")])
    printed = capsys.readouterr()
    assert "SECRET" not in printed.out + printed.err
    if rc == 0:
        assert not any(b"SECRET" in p.read_bytes() for p in (tmp_path / "fx").iterdir())
        assert "127.0.0.1" in (tmp_path / "fx" / "manifest.json").read_text()
    else:
        assert rc == 2 and "SECRET" not in one_line_error(printed.err)
    monkeypatch.setenv("HF_ENDPOINT", f"http://{userinfo}@127.0.0.1:9")  # unreachable: the error line names the host
    rc, err = _cli(["--source", f"hf:{REPO}", "--out", str(tmp_path / "fy")], capsys)
    line = one_line_error(err)
    assert rc == 2 and "cannot reach http://127.0.0.1:9" in line and "SECRET" not in err, line


@pytest.mark.parametrize("tail", ["?access_token=SECRET", "/?token=SECRET&x=1", "?api_key=SECRET", "#sig=SECRET",
                                  "?X-Amz-Signature=SECRET"])  # fmt: skip
def test_query_string_credentials_in_the_endpoint(tmp_path, hf_env, monkeypatch, capsys, tail):
    """A query string in HF_ENDPOINT: refused in one line (the Hub's paths are appended after it, so it can only
    break them), the secret redacted."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:9{tail}")
    rc, err = _cli(["--source", f"hf:{REPO}", "--out", str(tmp_path / "fx")], capsys)
    line = one_line_error(err)
    assert rc == 2 and "SECRET" not in err and "HF_ENDPOINT=http://127.0.0.1:9" in line
    assert "query string or fragment" in line and "HF_TOKEN" in line
    assert not (tmp_path / "fx").exists()


@pytest.mark.parametrize("text, want", [
    ("https://user:secret@host/x", "https://host/x"),
    ("https://user:pa/ss@host/x", "https://host/x"),  # a '/' in the password
    ("cannot reach http://a:p@ss/w@127.0.0.1:9 (ConnectError)", "cannot reach http://127.0.0.1:9 (ConnectError)"),
    ("'https://u:p@h' and https://k:q@j/y", "'https://h' and https://j/y"),
    ("https://h/?access_token=SECRET&rev=main", "https://h/?access_token=REDACTED&rev=main"),
    ("https://h/p?a=1&token=SECRET#frag", "https://h/p?a=1&token=REDACTED"),
    ("https://h?api_key=SECRET;key=SECRET;password=SECRET", "https://h?api_key=REDACTED;key=REDACTED;password=REDACTED"),
    ("https://h?X-Amz-Signature=SECRET&sig=SECRET&hf_token_v2=SECRET",
     "https://h?X-Amz-Signature=REDACTED&sig=REDACTED&hf_token_v2=REDACTED"),
    ("https://huggingface.co/org/repo/resolve/main/config.json?download=true",
     "https://huggingface.co/org/repo/resolve/main/config.json?download=true"),  # nothing secret: unchanged
])  # fmt: skip
def test_redact(text, want):
    from harness.common import redact

    assert redact(text) == want
