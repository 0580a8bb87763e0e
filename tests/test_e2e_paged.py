"""`e2e --paged`: a whole model served through a paged kernel in every layer, the harness's own pages and cache
writes, against transformers' generate.

Fast tier: the page pool itself; a 2-layer Llama and a 3-layer Gemma 3 (sliding window 4, shorter than every
prompt) through paged_naive and paged_split at page sizes 1 and 16, tokens and logits as transformers'; the catalog's
paged bugs diverge and the verdict names the step and the layer; user code through the command line in its worker;
bad input. Slow tier: SmolLM2-135M and Gemma 3 270M, 32 tokens.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT, SMALL, one_line_error
from plugins.paged_e2e import last_slot_as_zero

from harness.bugs.catalog import CATALOG, pick
from harness.common import run_cli
from harness.e2e.model import load_model
from harness.e2e.paged import run_paged_e2e
from harness.e2e.paged_verdict import LAYER_RTOL, verdict
from harness.e2e.pages import PagePool
from harness.e2e.prompts import DEFAULT_PROMPTS
from harness.e2e.run import main as e2e_main
from harness.verify.plugins import builtin, resolve
from impl import PAGED

QUIET = {"log": lambda *_: None}
PROMPTS = list(DEFAULT_PROMPTS[:2])
PAGED_REF = ROOT / "tests" / "plugins" / "paged_ref.py"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from checkpoints import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("paged") / "tiny-llama", config_overrides=SMALL,
                              dtype=torch.float32)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir), **QUIET)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    from checkpoints import make_family_checkpoint

    return load_model(str(make_family_checkpoint(tmp_path_factory.mktemp("paged") / "gemma3", "gemma3_text")),
                      **QUIET)  # fmt: skip


def passes(model, name, result) -> None:
    v = verdict(model, resolve(name, "paged"), result)
    for p in result.prompts:
        assert p.passed and p.tokens_equal and p.first_bad_step is None, (p.text_ref, p.text_impl)
        assert p.prefill_max_logit_abs_err <= p.tolerance and p.steps_max_logit_abs_err <= p.tolerance
    assert v.step is None and v.layer is None and "decode steps match" in v.text
    L = model.config["num_hidden_layers"]
    assert len(v.layer_rel_errs) == L and max(v.layer_rel_errs) < LAYER_RTOL / 10  # float32 noise, far below


# ---------------------------------------------------------------------------------------------------------
# the pool


def test_pool_pages_are_scattered_and_every_unowned_slot_is_nan():
    caps, P = [5, 17, 40], 4
    pool = PagePool(caps, P, seed=1)
    need = sum(math.ceil(n / P) for n in caps)
    assert pool.num_blocks >= 4 * need and pool.table.shape == (3, 11) and pool.table.dtype == torch.int32
    pool.begin([0, 1, 2], 3)  # a chunk into every sequence, then single tokens into two of them
    k = torch.arange(3 * 2 * 3 * 8, dtype=torch.float32).view(3, 2, 3, 8)  # (B, Hkv, n, d)
    pool.write(0, k, -k)
    for _ in range(14):
        pool.begin([1, 2], 1)
        pool.write(0, torch.ones(2, 2, 1, 8), torch.ones(2, 2, 1, 8))
    assert pool.lens.tolist() == [3, 17, 17] and pool.pages == [1, 5, 5]
    kc, vc, table, lens = pool.inputs(0)
    assert lens.tolist() == [17, 17] and table.shape == (2, 11)
    owned = pool.owned()
    assert int(owned.sum()) == 37 and torch.isnan(kc[~owned]).all() and torch.isfinite(kc[owned]).all()
    assert torch.equal(kc[pool.table[0, 0].long(), :3], k[0].transpose(0, 1))  # token t at slot t % P of its page
    used = torch.cat([pool.table[b, : pool.pages[b]] for b in range(3)])
    assert len(set(used.tolist())) == len(used) and pool.num_blocks - 1 in used.tolist()  # the pool's last block
    for b in (1, 2):  # no page is its predecessor's physical neighbour
        mine = pool.table[b, : pool.pages[b]]
        assert not bool((mine[1:] == mine[:-1] + 1).any())
    past = torch.cat([pool.table[b, pool.pages[b] :] for b in range(3)])
    assert not set(past.tolist()) & set(used.tolist())  # entries past a sequence's pages: blocks nobody owns


# ---------------------------------------------------------------------------------------------------------
# the built-ins: tokens and logits as transformers'


@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("name", ["paged_naive", "paged_split"])
def test_builtins_reproduce_generate_on_tiny_llama(tiny, name, page):
    result = run_paged_e2e(tiny, PAGED[name], PROMPTS, 8, page_size=page)
    assert result.page_size == page and result.decode_steps == 7 and result.tokens.shape == (2, 8)
    assert len({p.n_prompt_tokens for p in result.prompts}) == 2  # unequal lengths: no padding in the pool
    passes(tiny, name, result)


@pytest.mark.parametrize("name,page", [("paged_split", 16), ("paged_naive", 1)])
def test_builtins_reproduce_generate_on_tiny_gemma3(tiny_gemma3, name, page):
    """Sliding layers with a window (4) shorter than every prompt: the kernel gets window=(3, 0) on them, the
    scale query_pre_attn_scalar^-0.5, the harness the q/k norms and RoPE per layer type."""
    result = run_paged_e2e(tiny_gemma3, PAGED[name], PROMPTS, 6, page_size=page)
    assert min(p.n_prompt_tokens for p in result.prompts) > 3 * tiny_gemma3.config["sliding_window"]
    passes(tiny_gemma3, name, result)


# ---------------------------------------------------------------------------------------------------------
# the catalog's paged bugs: the verdict names the step and the layer


def run_bug(model, name: str, page: int = 16):
    fn = pick(name).kernel()
    result = run_paged_e2e(model, fn, PROMPTS, 6, page_size=page)
    return result, verdict(model, builtin(name, fn, "paged"), result)


def test_decode_query_at_zero_passes_prefill_and_fails_step_1_layer_0(tiny):
    """Prefill starts from an empty cache, so queries at 0 .. Sq - 1 are right there; the first decode step's
    query at position 0 sees only the first key."""
    result, v = run_bug(tiny, "decode_query_at_zero")
    assert not result.passed and v.step == 1 and v.layer == 0
    assert v.text.startswith("prefill matches; step 1 (token 2 of 6), layer 0: the attention output is ")
    assert "its new token in slot 13 of page 0" in v.text  # where the failing sequences' new tokens sat
    assert v.layer_rel_errs[0] > 100 * LAYER_RTOL and v.stage == "causal_mask", v.text
    assert all(p.first_bad_step == 1 and not p.tokens_equal for p in result.prompts)


# every paged bug of the catalog on the 2-layer Llama (prompts of 13 and 28 tokens): the step it fails, the stage
# the paged diagnosis's probes name (the catalog's own, but a decode query at 0 is the causal mask's alignment)
BUGS = [("block_table_ignored", 0, "block_table"), ("page_index_off_by_one", 0, "block_table"),
        ("slot_off_by_one_at_page_boundary", 0, "block_table"), ("seqlens_plus_one", 0, "seqlens"),
        ("seqlens_minus_one", 0, "seqlens"), ("seqlens_ignored", 1, "seqlens"),
        ("decode_query_at_zero", 1, "causal_mask"), ("split_merge_unrescaled", 0, "split_merge"),
        ("split_merge_average", 0, "split_merge")]  # fmt: skip


def test_every_paged_bug_of_the_catalog_is_here():
    names = {b.name for b in CATALOG if b.contract == "paged"}
    assert names == {n for n, _, _ in BUGS} | {"split_merge_lse_max"}


@pytest.mark.parametrize("name,step,stage", BUGS)
def test_catalog_paged_bug_named_by_step_and_layer(tiny, name, step, stage):
    """A wrong kernel is wrong in every layer, so layer 0 is the first to differ. One that reads slots no sequence
    owns reads NaN (the pool's unowned slots) and says so."""
    result, v = run_bug(tiny, name)
    assert not result.passed and v.step == step and v.layer == 0, v.text
    assert v.text.startswith("prefill, layer 0: " if step == 0 else f"prefill matches; step {step} "), v.text
    assert v.stage == stage and v.text.endswith(f"[{stage}]"), v.text
    nan = name in ("block_table_ignored", "page_index_off_by_one", "slot_off_by_one_at_page_boundary",
                   "seqlens_plus_one", "seqlens_ignored")  # fmt: skip
    assert ("holds NaN" in v.text) == nan and math.isinf(v.layer_rel_errs[0]) == nan, v.text


def test_a_wrong_lse_alone_does_not_change_the_model(tiny):
    """The model uses out, never lse: a merge whose lse is wrong but out right generates transformers' tokens
    (verify --paged catches it on its lse)."""
    result, v = run_bug(tiny, "split_merge_lse_max")
    assert result.passed and v.step is None


def test_page_size_1_and_a_boundary_only_bug(tiny):
    """slot_off_by_one_at_page_boundary with page 1: every token is a page's last slot."""
    result, v = run_bug(tiny, "slot_off_by_one_at_page_boundary", page=1)
    assert not result.passed and v.step == 0 and v.layer == 0 and v.stage == "block_table", v.text


def test_a_bug_that_waits_for_a_page_boundary_names_its_step(tiny):
    """The issue's example: a 13-token prompt, page 16: prefill and steps 1, 2 never touch slot 15; step 3's new
    token is the first to sit there."""
    result = run_paged_e2e(tiny, last_slot_as_zero, PROMPTS[:1], 6, page_size=16)
    v = verdict(tiny, builtin("last_slot_as_zero", last_slot_as_zero, "paged"), result)
    assert result.prompts[0].n_prompt_tokens == 13 and result.prompts[0].first_bad_step == 3
    assert v.text.startswith("prefill matches; step 3 (token 4 of 6), layer 0: "), v.text
    assert "sequence(s) 0 (length 16: its new token in slot 15 of page 0)" in v.text, v.text


# ---------------------------------------------------------------------------------------------------------
# the command line: user code in its worker, the JSON, bad input


def test_cli_user_kernel_in_its_worker(tiny_dir, tmp_path, capsys):
    d, out = str(tiny_dir), tmp_path / "paged.json"
    rc = run_cli(e2e_main, ["--model", d, "--paged", f"{PAGED_REF}:attn", "--tokens", "4", "--page-size", "3",
                            "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    assert doc["passed"] and doc["contract"] == "paged" and doc["page_size"] == 3 and doc["first_step"] is None
    assert "prefill and all 3 decode steps match" in text and "PASS: 3/3 prompts" in text
    rc = run_cli(e2e_main, ["--model", d, "--paged", f"{PAGED_REF}:query_at_zero", "--tokens", "4", "--json",
                            str(out)])  # fmt: skip
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert rc == 1 and "prefill matches; step 1 (token 2 of 4), layer 0: " in text, text
    assert doc["first_step"] == 1 and doc["first_layer"] == 0 and not doc["passed"]


@pytest.mark.parametrize("args,words", [
    (["--paged", "nosuch"], "unknown implementation 'nosuch' for the paged contract"),
    (["--paged", "paged_split", "--page-size", "0"], "--page-size"),
    (["--page-size", "4"], "--page-size goes with --paged"),
    (["--paged", "paged_split", "--impl", "tiled"], "drop --impl"),
    (["--paged", "paged_split", "--train"], "drop --impl, --module and --train"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2(args, words, capsys):
    rc = run_cli(e2e_main, args)
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and words in line, line


# ---------------------------------------------------------------------------------------------------------
# slow: the real models, 32 tokens


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", **QUIET)


@pytest.mark.gate  # real models / full matrices: a CI gate, out of make test's budget
@pytest.mark.parametrize("name", ["paged_split", "paged_naive"])
def test_smollm2_through_the_paged_builtins(smol, name):
    result = run_paged_e2e(smol, PAGED[name], list(DEFAULT_PROMPTS), 32)
    passes(smol, name, result)
    assert "Paris" in result.prompts[0].text_impl


@pytest.mark.gate  # real models / full matrices: a CI gate, out of make test's budget
def test_smollm2_decode_query_at_zero_named(smol):
    result, v = run_bug(smol, "decode_query_at_zero")
    assert v.step == 1 and v.layer == 0 and v.text.startswith("prefill matches; step 1"), v.text


@pytest.mark.gate  # real models / full matrices: a CI gate, out of make test's budget
def test_gemma3_270m_through_paged_split():
    gemma3 = load_model("gemma3-270m", **QUIET)
    result = run_paged_e2e(gemma3, PAGED["paged_split"], list(DEFAULT_PROMPTS), 32)
    passes(gemma3, "paged_split", result)
