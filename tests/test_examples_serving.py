"""An engine's own paged attention as a plug-in (issue 27): docs/examples/sglang_torch_native.py holds SGLang's
torch-native attention backend copied verbatim from its PyPI wheel, and passes `verify --paged` with an adapter of
at most 10 code lines; the same file with one copied line changed fails with the stage it breaks."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

from conftest import ROOT, run

EXAMPLE = ROOT / "docs/examples/sglang_torch_native.py"
BEGIN, END = "# ==== VERBATIM", "# ==== END VERBATIM ===="
ADAPTER_MAX = 10
QUICK = ["--quick", "--dtype", "float32"]
# the extend path's gather (the one in use): each token's slot read one token late
GATHER = """per_req_tokens = req_to_token[req_pool_idx, start_kv:end_kv]
            per_req_key = k_cache[per_req_tokens].movedim(0, query.dim() - 2)
            per_req_value = v_cache[per_req_tokens].movedim(0, query.dim() - 2)

            if not (per_req_query.dtype == per_req_key.dtype == per_req_value.dtype):
                # scaled_dot_product_attention() expects query, key, and value to have the same dtype
                per_req_key = per_req_key.to(per_req_query.dtype)
                per_req_value = per_req_value.to(per_req_query.dtype)

            attn_mask = None
            is_causal = causal
            if sliding_window_size is not None and sliding_window_size > -1:
                attn_mask = self._make_sliding_window_mask(
                    q_len=seq_len_kv,"""
LATE = GATHER.replace("start_kv:end_kv]", "start_kv + 1 : end_kv + 1]", 1)


def blocks(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(the adapter's lines: outside the docstring and the VERBATIM blocks; [(a block's recorded sha256, its text)])."""
    lines = text.splitlines(keepends=True)
    doc_end = ast.parse(text).body[0].end_lineno  # the header docstring is the first statement
    adapter, copies, inside = [], [], None
    for line in lines[doc_end:]:
        if line.startswith(END):
            copies.append(inside)
            inside = None
        elif line.startswith(BEGIN):
            inside = (re.search(r"sha256 ([0-9a-f]{64})", line).group(1), "")
        elif inside is not None:
            inside = (inside[0], inside[1] + line)
        else:
            adapter.append(line)
    return adapter, copies


def verify(tmp_path: Path, spec: str) -> tuple[int, dict, str]:
    out = tmp_path / "v.json"
    p = run(["-m", "harness", "verify", *QUICK, "--paged", spec, "--json", str(out)])
    assert "Traceback" not in p.stdout, p.stdout[-3000:]
    (verdict,) = [v for v in json.loads(out.read_text())["verdicts"] if v["impl"] == spec]
    return p.returncode, verdict, p.stdout


def test_the_copy_is_unchanged_and_the_adapter_small():
    adapter, copies = blocks(EXAMPLE.read_text())
    assert len(copies) == 2
    for sha, text in copies:  # the recorded hashes were taken from the wheel's file when it was copied
        assert hashlib.sha256(text.encode()).hexdigest() == sha
    assert "class TorchNativeAttnBackend" in copies[1][1] and "def _run_sdpa_forward_extend" in copies[1][1]
    code = [line for line in adapter if line.strip() and not line.lstrip().startswith("#")]
    assert 0 < len(code) <= ADAPTER_MAX, "".join(code)
    assert any(line.startswith("def attn(q, k_cache, v_cache, *, block_table, cache_seqlens") for line in code)


def test_the_example_imports_no_engine_and_no_transformers():
    tree = ast.parse(EXAMPLE.read_text())
    typing_only = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    skip = {id(x) for n in typing_only for x in ast.walk(n)}  # imports for annotations only: never run
    nodes = [n for n in ast.walk(tree) if id(n) not in skip]
    mods = [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module or "" for n in nodes if isinstance(n, ast.ImportFrom)]
    assert mods and {m.split(".")[0] for m in mods} <= {"__future__", "typing", "torch"}, mods


def test_sglang_passes_and_a_token_read_late_fails_block_table(tmp_path):
    spec = "docs/examples/sglang_torch_native.py:attn"
    code, verdict, stdout = verify(tmp_path, spec)
    assert code == 0 and verdict["passed"] is True and verdict["contract"] == "paged", stdout[-3000:]
    text = EXAMPLE.read_text()
    assert text.count(GATHER) == 1
    mutant = tmp_path / "late.py"
    mutant.write_text(text.replace(GATHER, LATE))
    code, verdict, stdout = verify(tmp_path, f"{mutant}:attn")
    assert code == 1 and verdict["passed"] is False and verdict["stage"] == "block_table", (verdict, stdout[-2000:])
    assert "token t + 1's slot for token t" in verdict["hint"], verdict["hint"]
