"""`python -m harness e2e` and `plot-attention`: our attention in every layer of a whole model, against transformers.

Fast tier: a 2-layer Llama with Llama-3.2-1B's RoPE (llama3 scaling) and random weights, loaded from a local
directory and from the loopback Hub; bad input. Slow tier: SmolLM2-135M-Instruct, real trained weights, every
built-in with the default prompts and 32 tokens, a broken plug-in through the command line, and the picture.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, SMALL, one_line_error, run
from plugins import broken

from harness.common import UserError, resolve_device, run_cli
from harness.e2e.infer import greedy, hf_generate, run_e2e, teacher_forced
from harness.e2e.model import load_model
from harness.e2e.prompts import DEFAULT_PROMPTS, encode_prompt, left_pad, read_prompts
from harness.e2e.run import main as e2e_main
from harness.e2e.swap import swapped
from impl import CORES, IMPLEMENTATIONS, INTERPRETED_ON_CPU

QUIET = {"log": lambda *_: None}
SHORT_PROMPTS = ["What is the capital of France?", "Name three colours, please."]  # unequal lengths: padding


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from checkpoints import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("e2e") / "tiny-llama", config_overrides=SMALL,
                              dtype=torch.float32)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir), **QUIET)


def real_greedy(model, fn, prompts, n):
    """The swapped model generating for real, one full-sequence step at a time (no teacher forcing)."""
    rows = [encode_prompt(model.tokenizer, p) for p in prompts]
    ids, mask, pos = left_pad(rows, 0)
    with swapped(model, fn, "contract") as r:
        return greedy(model.lm, r, ids, mask, pos, n)[1]  # (B, n)


# ---------------------------------------------------------------------------------------------------------
# fast: a tiny Llama with llama3 RoPE scaling


@pytest.mark.parametrize("name", [n for n in IMPLEMENTATIONS if n not in INTERPRETED_ON_CPU])
def test_builtins_reproduce_hf_on_tiny_llama(tiny, name):
    results = run_e2e(tiny, IMPLEMENTATIONS[name], CORES[name], list(DEFAULT_PROMPTS), 12)
    assert tiny.config["rope_parameters"]["rope_type"] == "llama3"
    assert len({r.n_prompt_tokens for r in results}) == 3  # left padding was exercised
    for r in results:
        assert r.tokens_equal and r.decode_tokens_equal, (r.text_ref, r.text_impl, r.text_decode)
        assert r.max_logit_abs_err <= r.tolerance and r.generate_max_logit_abs_err <= r.tolerance
        assert r.decode_max_logit_abs_err <= r.tolerance
        assert r.argmax_agreement == 1.0 and r.passed


def test_plugin_without_a_core_skips_only_the_kv_path(tiny):
    (r,) = run_e2e(tiny, IMPLEMENTATIONS["naive"], None, SHORT_PROMPTS[:1], 4)
    assert r.passed and r.tokens_equal and r.decode_tokens_equal is None and r.decode_max_logit_abs_err is None


@pytest.mark.parametrize("bug", ["gqa_repeat", "scale_missing", "padding_ignored"])
def test_broken_plugin_changes_tokens(tiny, bug):
    fn = getattr(broken, bug)
    results = run_e2e(tiny, fn, None, SHORT_PROMPTS, 8)
    assert not all(r.passed for r in results)
    bad = [r for r in results if not r.tokens_equal]
    assert bad, "a broken attention in every layer must change some generated token"
    for r in bad:
        assert r.text_impl != r.text_ref  # the report shows what the broken model says instead


@pytest.mark.parametrize("fn", [IMPLEMENTATIONS["tiled"], broken.gqa_repeat, broken.scale_missing],
                         ids=["tiled", "gqa_repeat", "scale_missing"])  # fmt: skip
def test_teacher_forcing_decides_like_real_generation(tiny, fn):
    """Teacher-forced argmaxes agree with real greedy generation up to and including the first divergence."""
    n = 10
    rows = [encode_prompt(tiny.tokenizer, p) for p in SHORT_PROMPTS]
    ids, mask, pos = left_pad(rows, 0)
    ref_tokens, _ = hf_generate(tiny.lm, ids, mask, n)
    with swapped(tiny, fn, "contract") as r:
        _, tf, _ = teacher_forced(tiny.lm, r, ids, mask, pos, ref_tokens)
    real = real_greedy(tiny, fn, SHORT_PROMPTS, n)
    for b in range(len(rows)):
        first = lambda t: next((i for i in range(n) if t[i] != ref_tokens[b, i]), n)  # noqa: B023
        k = first(tf[b])
        assert first(real[b]) == k
        assert torch.equal(real[b, : min(k + 1, n)], tf[b, : min(k + 1, n)])


def test_non_causal_plugin_is_generated_for_real(tiny):
    """Teacher forcing would let a model without a causal mask read the very token it must predict; the causality
    check catches that and the verdict comes from real generation."""
    n = 8
    rows = [encode_prompt(tiny.tokenizer, p) for p in SHORT_PROMPTS]
    ids, mask, _ = left_pad(rows, 0)
    ref_tokens, _ = hf_generate(tiny.lm, ids, mask, n)
    real = real_greedy(tiny, broken.causal_missing, SHORT_PROMPTS, n)
    results = run_e2e(tiny, broken.causal_missing, None, SHORT_PROMPTS, n)
    for b, r in enumerate(results):
        assert not r.passed
        assert r.tokens_equal == torch.equal(real[b], ref_tokens[b])
        assert r.text_impl == tiny.tokenizer.decode(real[b])


def test_swapped_restores_the_model_after_a_crash(tiny):
    def crash(x, weights, **_):
        raise RuntimeError("boom")

    before = [layer.self_attn for layer in tiny.layers]
    with pytest.raises(RuntimeError, match="boom"), swapped(tiny, crash):
        tiny.lm(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    assert [layer.self_attn for layer in tiny.layers] == before


def test_cli_json_and_table(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(SHORT_PROMPTS))
    out = tmp_path / "e2e.json"
    rc = run_cli(e2e_main, ["--model", str(tiny_dir), "--impl", "sdpa", "--prompts", str(prompts), "--tokens", "6",
                            "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    assert doc["impl"] == "sdpa" and doc["passed"] is True and doc["model"] == str(tiny_dir)
    assert isinstance(doc["seconds"], float) and len(doc["prompts"]) == 2
    for p in doc["prompts"]:
        assert p["tokens_equal"] is True and p["decode_tokens_equal"] is True
        assert 0 <= p["max_logit_abs_err"] <= p["tolerance"] and p["argmax_agreement"] == 1.0
    assert "PASS: 2/2 prompts" in text and "identical" in text
    device = str(resolve_device(None))  # the run's device, as the command chose it
    assert doc["device"] == device and all(p["device"] == device for p in doc["prompts"])


def test_cli_train_json(tiny_dir, tmp_path, capsys):
    """--train on the tiny Llama: the loss of every step and the worst gradient, with the device, in the JSON."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(SHORT_PROMPTS))
    out = tmp_path / "train.json"
    rc = run_cli(e2e_main, ["--model", str(tiny_dir), "--train", "--impl", "sdpa", "--steps", "1", "--prompts",
                            str(prompts), "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    assert doc["train"] is True and doc["passed"] is True and len(doc["loss_ref"]) == 2
    assert doc["device"] == str(resolve_device(None))
    assert "PASS: training sdpa" in text


@pytest.mark.slow
def test_cli_broken_plugin_exit_1_with_texts(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(SHORT_PROMPTS) + "\n\n")
    out = tmp_path / "e2e.json"
    spec = f"{ROOT / 'tests' / 'plugins' / 'broken.py'}:gqa_repeat"
    rc = run_cli(e2e_main, ["--model", str(tiny_dir), "--impl", spec, "--prompts", str(prompts), "--tokens", "6",
                            "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 1
    assert "tokens differ for" in text and "HF generate :" in text and "swapped     :" in text and "FAIL" in text
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and any(p["tokens_equal"] is False for p in doc["prompts"])
    assert all(p["decode_tokens_equal"] is None for p in doc["prompts"])  # a plug-in has no KV path


@pytest.mark.slow
def test_cli_crashing_plugin_is_a_failure_not_a_traceback(tiny_dir, tmp_path, capsys):
    plugin = tmp_path / "crash.py"
    plugin.write_text("def attention(x, weights, **kw):\n    raise ValueError('shapes do not line up')\n")
    rc = run_cli(e2e_main, ["--model", str(tiny_dir), "--impl", f"{plugin}:attention", "--tokens", "2"])
    assert rc == 1
    assert "raised ValueError: shapes do not line up" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--tokens", "0"], "--tokens 0"),
        (["--prompts", "/nonexistent/prompts.txt"], "no such file"),
        (["--impl", "nosuch"], "unknown implementation"),
        (["--model", "/nonexistent/model"], "neither smollm2-135m"),
        (["--model", "hf:no-slash"], "expected hf:OWNER/NAME"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_one_line_exit_2(args, needle, capsys):
    try:
        rc = run_cli(e2e_main, args)
    except SystemExit as e:  # argparse's usage errors exit from inside the parser
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_bad_prompt_files(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "num.json").write_text("[1, 2]")
    (tmp_path / "empty.txt").write_text("\n  \n")
    for name, needle in (("bad.json", "not valid JSON"), ("num.json", "list of strings"), ("empty.txt", "no prompts")):
        with pytest.raises(UserError, match=needle):
            read_prompts(str(tmp_path / name))
    (tmp_path / "ok.txt").write_text("one\n\ntwo\n")
    assert read_prompts(str(tmp_path / "ok.txt")) == ["one", "two"]


def test_non_llama_model_refused_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(UserError, match="not a Llama-architecture model"):
        load_model(str(tmp_path), **QUIET)


def test_hub_model_download_and_gated(tiny_dir, hf_env, monkeypatch):
    from hubmock import MockHub

    repo = "meta-llama/Llama-3.2-1B-Instruct"
    with MockHub({repo: tiny_dir}, gated={repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(UserError, match="gated.*HF_TOKEN"):
            load_model(f"hf:{repo}", **QUIET)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        m = load_model(f"hf:{repo}", **QUIET)
    local = load_model(str(tiny_dir), **QUIET)
    for (n, a), (_, b) in zip(m.lm.state_dict().items(), local.lm.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # now cached: works offline, with no server at all
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert load_model(f"hf:{repo}", **QUIET).config == local.config
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set.*--model DIR"):
        load_model("hf:meta-llama/Other-Model", **QUIET)


def test_smollm2_cache_is_written_atomically(tmp_path, monkeypatch):
    """An interrupted dequantization leaves nothing behind, so the next run starts clean."""
    from harness.e2e import model as M

    monkeypatch.setenv("ATTN_HARNESS_CACHE", str(tmp_path / "cache"))

    def interrupted(gguf, out):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "_dequantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m", **QUIET)
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# slow: SmolLM2-135M-Instruct, real trained weights


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", **QUIET)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiled"])  # the others: the tiny Llama above (the same code paths); all: `make e2e`
def test_smollm2_builtins_reproduce_hf(smol, name):
    results = run_e2e(smol, IMPLEMENTATIONS[name], CORES[name], list(DEFAULT_PROMPTS), 16)
    for r in results:
        print(f"\n[e2e {name}] {r.n_prompt_tokens} tokens: prefill {r.max_logit_abs_err:.2e}, steps "
              f"{r.generate_max_logit_abs_err:.2e}, decode {r.decode_max_logit_abs_err:.2e}, HF sdpa "
              f"{r.hf_sdpa_max_logit_abs_err:.2e}, tolerance {r.tolerance:.1e}")  # fmt: skip
        assert r.tokens_equal and r.decode_tokens_equal, (r.text_ref, r.text_impl, r.text_decode)
        assert r.argmax_agreement == 1.0
        # at the level of HF's own sdpa-vs-eager noise (docs/e2e.md has the numbers): far inside the tolerance
        assert max(r.max_logit_abs_err, r.generate_max_logit_abs_err, r.decode_max_logit_abs_err) <= r.tolerance
        assert r.passed
    assert "Paris" in results[0].text_ref  # the real model, really answering


@pytest.mark.slow
def test_smollm2_cache_matches_the_committed_fixture(smol):
    """Two independent dequantizations agree: transformers' GGUF loading (the cached model) and the gguf library's
    (with our q/k un-permutation) that made fixtures/smollm2-135m: the four weights and the layer's input."""
    from harness.checkpoints.format import WEIGHT_NAMES, load_fixture

    f = load_fixture("smollm2-135m")
    attn = smol.layers[f.layer].self_attn
    for n in WEIGHT_NAMES:
        assert torch.equal(getattr(attn, n).weight.detach(), f.weights[n].float()), n
    # and the layer's input: transformers' embedding and RMSNorm of the fixture's tokens, exactly
    with torch.no_grad():
        emb = smol.lm.model.embed_tokens(f.inputs["token_ids"])
        want = smol.layers[f.layer].input_layernorm(emb)
    torch.testing.assert_close(f.inputs["hidden_states"], want, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_plot_attention_probabilities_match_hf(impl, smol):
    """naive's stage-3 probabilities, and tiled's rebuilt from its log-sum-exp, equal HF eager's attn_weights."""
    from harness.e2e import plot

    ids = smol.tokenizer(plot.DEFAULT_PROMPT, return_tensors="pt")["input_ids"]
    x, pos, w, ref = plot.layer_input(smol, ids, 0)
    ours = plot.our_probs(impl, x, pos, w, smol.config)
    assert ours.shape == ref.shape == (1, 9, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sum(-1), torch.ones(1, 9, ids.shape[1]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_plot_attention_cli(tmp_path):
    out = tmp_path / "a.png"
    p = run(["-m", "harness", "plot-attention", "--out", str(out), "--heads", "0,4", "--layer", "2"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "OK" in p.stdout
    bad = run(["-m", "harness", "plot-attention", "--heads", "0,99", "--out", str(tmp_path / "b.png")])
    assert bad.returncode == 2 and "has heads 0..8" in one_line_error(bad)
    assert not (tmp_path / "b.png").exists()
