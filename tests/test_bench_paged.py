"""The paged decode bench (`bench --paged`, harness/bench/paged.py): what its rows say, checked against independent
counts at small sizes, and its page (fast tier).

- paged_triton's ratio is the interpreter's count of the kernel's loads and stores, taken here on the same inputs,
  over the KV-cache bytes computed from the pool's own tensors; past the interpreter's budget the row is the closed
  form, labelled so.
- paged_naive's and paged_split's traffic is the meter's count of a call; they gather, so every owned K/V byte is
  read from the pool, written to the gathered copy and read again by the matmul: above 3x the limit.
- The page's generated block is built from the JSON alone (the committed page and JSON agree); the targets say MET
  or MISSED by the goal; bad options are one line, exit 2, before any work.
Timings are never asserted.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT, one_line_error

from harness.bench import meter, paged, report
from harness.bench.kernel_traffic import count
from harness.common import generated_block, update_generated
from impl import PAGED
from impl import paged_triton as pt

SMALL = paged.Setup(B=2, H=32, Hkv=8, d=64, page=16)  # Llama-3.2-1B's heads, a small batch
PAGE = ROOT / "docs" / "bench-paged.md"
PAGE_JSON = ROOT / "docs" / "bench-paged.json"


@pytest.fixture
def no_roofline(monkeypatch):
    """The command line without its roofline measurement (seconds): these tests check what the rows say."""
    monkeypatch.setattr(meter, "roofline", lambda device=None, runs=10: {"matmul_gflops": 100.0,
                                                                         "matmul_shape": [1, 1, 1], "copy_gbps": 10.0})


def owned_kv_bytes(x: dict) -> int:
    """Every owned token's K and V, from the tensors themselves: a token's [Hkv, d] slot, times the tokens, twice."""
    return 2 * int(x["cache_seqlens"].sum()) * x["k_cache"][0, 0].nbytes


def test_the_batch_is_a_shuffled_pool_of_exactly_its_pages():
    L = 100  # 7 pages, the last one partly owned
    x = paged.batch(SMALL, L)
    assert x["k_cache"].shape == (SMALL.B * 7, 16, 8, 64) and x["q"].shape == (SMALL.B, 32, 1, 64)
    assert sorted(x["block_table"].flatten().tolist()) == list(range(SMALL.B * 7))  # every block used once
    assert x["block_table"].dtype == torch.int32 and x["cache_seqlens"].tolist() == [L] * SMALL.B
    assert x["block_table"][0].tolist() != sorted(x["block_table"][0].tolist())  # not in order
    assert SMALL.kv_bytes(L) == owned_kv_bytes(x)


def test_triton_ratio_is_the_interpreter_count_over_the_kv_cache():
    """At a small size the row's ratio is exactly the count taken here / the KV bytes of the pool's owned slots."""
    L = 100
    x = paged.batch(SMALL, L, seed=3)
    row = paged.triton_row(SMALL, L, x, last=(1, 0.0), max_s=600.0)
    with count() as t:
        PAGED["paged_triton"](x["q"], x["k_cache"], x["v_cache"], block_table=x["block_table"],
                              cache_seqlens=x["cache_seqlens"])  # fmt: skip
    assert t.load_calls > 0, "the kernel did not run in the interpreter"
    assert row.traffic_method == paged.COUNTED and row.interpreted_s is not None
    assert (row.load_bytes, row.store_bytes, row.traffic_bytes) == (t.load_bytes, t.store_bytes, t.total_bytes)
    assert row.kv_cache_bytes == owned_kv_bytes(x)
    assert row.ratio == t.total_bytes / owned_kv_bytes(x)
    assert row.closed_form_bytes == t.total_bytes and row.note == "counted == closed form"
    assert 1.0 < row.ratio  # the limit is a floor: q, the table entries, out and lse come on top


def test_triton_past_the_interpreters_budget_is_the_closed_form():
    L = 100
    x = paged.batch(SMALL, L)
    row = paged.triton_row(SMALL, L, x, last=(L, 1000.0), max_s=60.0)  # projected 1000 s
    closed = pt.traffic([L] * SMALL.B, H=32, Hkv=8, Sq=1, d=64, page_size=16, dtype=torch.float32)
    assert row.traffic_method == paged.CLOSED_FORM and row.interpreted_s is None
    assert row.traffic_bytes == closed["load_bytes"] + closed["store_bytes"] == row.closed_form_bytes
    assert row.ratio == row.traffic_bytes / owned_kv_bytes(x)
    assert "projected 1000 s" in row.note and "--max-interpreted-s" in row.note
    assert paged.interpreter_work(SMALL, 4 * L) > paged.interpreter_work(SMALL, L)  # the projection grows with L


@pytest.mark.parametrize("name", ["paged_naive", "paged_split"])
def test_gathering_kernels_are_metered_at_aten_op_boundaries(name):
    L = 200
    x = paged.batch(SMALL, L)
    row = paged.aten_row(name, SMALL, L, x)
    m, _ = meter.meter_call(lambda: paged.step(name, x))
    assert row.traffic_method == paged.ATEN and (row.traffic_bytes, row.aten_ops) == (m.traffic, m.ops)
    assert row.ratio == m.traffic / owned_kv_bytes(x)
    assert row.ratio > 3  # each owned byte: read by the gather, written to the copy, read by the matmul


def test_gathers_are_metered_by_what_they_select():
    """The meter counts a gather's source by the elements it picks: a sequence's pages, not the whole pool (which
    would make the gathering kernels' traffic grow with the pool's size)."""
    pool, idx = torch.ones(1000, 16, 8), torch.tensor([3, 1, 4, 1, 5])
    row, pair = 16 * 8 * 4, 8 * 4  # bytes of pool[i] and of pool[i, j]
    for fn, out_bytes, index_bytes in ((lambda: pool[idx], 5 * row, idx.nbytes),
                                       (lambda: pool.index_select(0, idx), 5 * row, idx.nbytes),
                                       (lambda: pool[idx, idx], 5 * pair, 2 * idx.nbytes)):  # fmt: skip
        m, out = meter.meter_call(fn)
        assert out.nbytes == out_bytes
        assert m.traffic == index_bytes + 2 * out_bytes  # the picked elements read, the result written
    small, zeros = torch.ones(2, 2), torch.zeros(100, dtype=torch.long)
    m, _ = meter.meter_call(lambda: small[zeros])
    assert m.traffic == small.nbytes + 100 * 8 + 100 * 2 * 4  # at most the source itself


def _doc(rows, copy_gbps=10.0) -> dict:
    doc = {"machine": {"cpu": "cpu x", "cores": 2, "threads": 1, "torch": "2.x", "device": "cpu"},
           "roofline": {"copy_gbps": copy_gbps}, "setup": asdict(paged.Setup()), "rows": [asdict(r) for r in rows]}
    doc["targets"] = paged.targets(doc)
    return doc


def _rows(triton_ratio: float) -> list:
    kv = 10**9
    tri = paged.Row("paged_triton", 32768, kv, traffic_bytes=int(triton_ratio * kv), ratio=triton_ratio,
                    traffic_method=paged.CLOSED_FORM, note="interpreted (no GPU): projected 130 s")
    naive = paged.Row("paged_naive", 32768, kv, traffic_bytes=4 * kv, ratio=4.0, traffic_method=paged.ATEN,
                      median_s=2.0, min_s=1.5, max_s=3.0, runs=5, time_method=paged.TIME_WALL)
    split = paged.Row("paged_split", 32768, kv, traffic_bytes=5 * kv, ratio=5.0, traffic_method=paged.ATEN,
                      median_s=1.0, min_s=0.9, max_s=1.1, runs=5, time_method=paged.TIME_WALL)
    return [tri, naive, split]


def test_the_page_says_the_goal_and_where_each_number_comes_from(tmp_path):
    doc = _doc(_rows(1.004))
    text = paged.markdown(doc)
    assert "| `paged_triton` | 32768 | 1 GB | 1 GB (closed form) | 1.0040x | - (interpreted: no kernel time) |" in text
    assert ("| `paged_naive` | 32768 | 1 GB | 4 GB (aten op boundaries) | 4.0000x | 2 s (1.5..3), 5 calls | 0.1 s |"
            in text)  # the limit's time: 1 GB at 10 GB/s
    assert ("- paged_triton traffic / KV cache <= 1.1x at 32768 tokens: 1.0040x (1 GB closed form / 1 GB) (**MET**)"
            in text)
    assert "paged_split / paged_naive (one process, in turns): 0.50x (1 s vs 2 s; the limit here 0.1 s) (n/a)" in text
    assert "paged_naive traffic / KV cache (aten op boundaries: it gathers): 32768: 4.00x (n/a)" in text
    assert "(**MISSED**)" in paged.markdown(_doc(_rows(1.2)))
    page = tmp_path / "p.md"
    page.write_text("# x\n<!-- generated by: scripts/bench.py --paged -->\nold\n<!-- end generated -->\nafter\n")
    update_generated(page, text)
    assert "old" not in page.read_text() and "after" in page.read_text() and "`paged_split`" in page.read_text()


def test_the_command_line_writes_json_and_page(tmp_path, no_roofline, capsys):
    page, out = tmp_path / "p.md", tmp_path / "p.json"
    page.write_text("<!-- generated by: x -->\n<!-- end generated -->\n")
    assert report.main(["--paged", "--tokens", "40", "--batch", "1", "--runs", "1", "--json", str(out),
                        "--doc", str(page)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert [(r["impl"], r["tokens"]) for r in doc["rows"]] == [(i, 40) for i in paged.IMPLS]
    assert doc["rows"][0]["traffic_method"] == paged.COUNTED  # 40 tokens: well inside the interpreter's budget
    lines, start, end = generated_block(page)
    assert "".join(lines[start + 1 : end]) == paged.markdown(doc)
    verdict = "MET" if doc["rows"][0]["ratio"] <= paged.GOAL else "MISSED"  # 40 tokens: q, out, lse weigh ~10%
    assert f"{verdict:6s}  paged_triton traffic / KV cache <= 1.1x at 40 tokens" in capsys.readouterr().out


def test_the_committed_page_is_the_committed_json():
    """docs/bench-paged.md's block is what its JSON makes, at the documented shapes; the 32k row is within the goal
    and its bytes are the closed form's (recomputed here); every counted row equals the closed form."""
    doc = json.loads(PAGE_JSON.read_text())
    lines, start, end = generated_block(PAGE)
    assert "".join(lines[start + 1 : end]) == paged.markdown(doc)
    assert doc["setup"] == asdict(paged.llama_setup())
    st = paged.Setup(**doc["setup"])
    assert {(r["impl"], r["tokens"]) for r in doc["rows"]} == {(i, n) for i in paged.IMPLS for n in paged.TOKENS}
    for r in doc["rows"]:
        assert r["kv_cache_bytes"] == st.kv_bytes(r["tokens"])
        assert r["ratio"] == r["traffic_bytes"] / r["kv_cache_bytes"]
        if r["impl"] == "paged_triton":
            closed = paged.closed_form(st, r["tokens"])
            assert r["traffic_bytes"] == closed["load_bytes"] + closed["store_bytes"], r
        else:
            assert r["median_s"] is not None and r["ratio"] > 3
    (big,) = [r for r in doc["rows"] if (r["impl"], r["tokens"]) == ("paged_triton", 32768)]
    assert big["ratio"] <= paged.GOAL


@pytest.mark.parametrize("args, says", [
    (["--page-size", "12"], "--page-size 12"), (["--impl", "paged_bogus"], "--impl paged_bogus"),
    (["--tokens", "0"], "--tokens"), (["--tokens", "1048576", "--batch", "1024"], "--tokens 1048576"),
    (["--dtype", "int8"], "--dtype"), (["--doc", "/nonexistent-dir/x.md"], "--doc")])  # fmt: skip
def test_bad_options_are_one_line_exit_2(args, says, capsys):
    try:
        rc = report.cli(["--paged", *args])
    except SystemExit as e:  # argparse's own errors (a --dtype not among the choices) exit from the parser
        rc = e.code
    assert rc == 2
    assert says in one_line_error(capsys.readouterr().err)
