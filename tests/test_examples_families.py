"""A family's own reference code as a plug-in (issue 26): docs/examples/qwen3_verbatim.py holds Qwen3's attention
copied verbatim from transformers' modeling_qwen3.py, without importing transformers, and passes `verify --module`
with an adapter of at most 10 code lines; the same file with one copied line changed fails."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import transformers
from conftest import ROOT, run

EXAMPLE = ROOT / "docs/examples/qwen3_verbatim.py"
SOURCE = Path(transformers.__file__).parent / "models/qwen3/modeling_qwen3.py"
BEGIN, END = "# ==== VERBATIM:", "# ==== END VERBATIM ===="
ADAPTER_MAX = 10
QUICK = ["--fixture", "qwen3-synthetic", "--quick", "--dtype", "float32"]
K_NORM = "key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)"
NO_K_NORM = "key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)"


def parts(text: str) -> tuple[list[str], str]:
    """(the adapter's lines: everything outside the module docstring and the VERBATIM markers, the copy's text)."""
    lines = text.splitlines()
    doc_end = ast.parse(text).body[0].end_lineno  # the header docstring is the first statement
    begin = next(i for i, line in enumerate(lines) if line.startswith(BEGIN))
    end = lines.index(END)
    return lines[doc_end:begin] + lines[end + 1 :], "\n".join(lines[begin + 1 : end])


def verify(tmp_path: Path, spec: str) -> tuple[int, dict, str]:
    """`attention-verify verify` on qwen3-synthetic, float32, --quick: (exit code, the verdict, stdout)."""
    out = tmp_path / "v.json"
    p = run(["-m", "harness", "verify", *QUICK, "--module", spec, "--json", str(out)])
    assert "Traceback" not in p.stdout, p.stdout[-3000:]
    (verdict,) = [v for v in json.loads(out.read_text())["verdicts"] if v["impl"] == spec]
    return p.returncode, verdict, p.stdout


def test_adapter_has_at_most_ten_code_lines():
    adapter, _ = parts(EXAMPLE.read_text())
    code = [line for line in adapter if line.strip() and not line.lstrip().startswith("#")]
    assert 0 < len(code) <= ADAPTER_MAX, "\n".join(code)
    assert any(line.startswith("def build(config") for line in code)  # the module contract's factory is here


def test_verbatim_block_is_transformers_own_text():
    _, copy = parts(EXAMPLE.read_text())
    source = SOURCE.read_text()
    blocks = [b for b in copy.split("\n\n\n") if b.strip()]  # top-level statements: two blank lines apart
    assert len(blocks) >= 8, len(blocks)  # imports, RMSNorm, rotary, rotate_half, apply_rotary, repeat_kv, eager, attn
    for b in blocks:
        assert b.strip("\n") in source, b[:200]
    for name in ("Qwen3RMSNorm", "Qwen3RotaryEmbedding", "apply_rotary_pos_emb", "eager_attention_forward"):
        assert f"{name}(" in copy
    assert K_NORM in copy  # the line the mutation below removes


def test_example_never_imports_transformers():
    tree = ast.parse(EXAMPLE.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not any(m.split(".")[0] == "transformers" or not m for m in imported), imported
    assert all(n.level == 0 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))  # no relative `from ...x`


def test_verbatim_qwen3_passes_and_without_k_norm_fails(tmp_path):
    spec = "docs/examples/qwen3_verbatim.py:build"
    code, verdict, stdout = verify(tmp_path, spec)
    assert code == 0 and verdict["passed"] is True and verdict["contract"] == "module", stdout[-2000:]
    mutant = tmp_path / "no_k_norm.py"
    text = EXAMPLE.read_text()
    assert text.count(K_NORM) == 1
    mutant.write_text(text.replace(K_NORM, NO_K_NORM))
    code, verdict, stdout = verify(tmp_path, f"{mutant}:build")
    assert code == 1 and verdict["passed"] is False, stdout[-2000:]
    assert verdict["stage"] == "qk_norm", verdict  # named from the fixture's fields: its k_norm is skipped
    assert "k_norm" in verdict["hint"], verdict
