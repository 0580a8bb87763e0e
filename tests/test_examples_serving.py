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
LENGTH = "seq_len_kv = seq_lens[seq_idx]\n            end_q"  # the extend path's key count (the one in use)
SHORT = "seq_len_kv = seq_lens[seq_idx] - 1\n            end_q"


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


def test_sglang_passes_and_a_short_read_fails_seqlens(tmp_path):
    spec = "docs/examples/sglang_torch_native.py:attn"
    code, verdict, stdout = verify(tmp_path, spec)
    assert code == 0 and verdict["passed"] is True and verdict["contract"] == "paged", stdout[-3000:]
    text = EXAMPLE.read_text()
    assert text.count(LENGTH) == 1
    mutant = tmp_path / "short.py"
    mutant.write_text(text.replace(LENGTH, SHORT))
    code, verdict, stdout = verify(tmp_path, f"{mutant}:attn")
    assert code == 1 and verdict["passed"] is False and verdict["stage"] == "seqlens", (verdict, stdout[-2000:])
