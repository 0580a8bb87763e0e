"""The bit-exact note (issue 24): what the harness cannot stop is code that computes the reference itself; an
implementation whose float32 output equals transformers' eager output bit for bit on every row gets a note after
the table and "bit_exact": true in its verdict, never a failure (the exit code stays what the verdicts make it)."""

from __future__ import annotations

import json

import pytest
from conftest import run

from harness.verify import report
from harness.verify.compare import Comparison
from harness.verify.records import Row, Verdict

CHEAT = "tests/plugins/computes_reference.py:attention"
NOTE = ("matches transformers' eager output bit for bit on every float32 row (smollm2-135m): it may compute the "
        "reference itself (imports transformers) or read the fixture's golden output; the harness cannot tell these "
        "apart from an exact port.")  # fmt: skip


def row(scenario: str, err: float, dtype: str = "float32", check: str = "forward", impl: str = "x") -> Row:
    c = Comparison(err <= 1e-3, err, None, err, err, 1e-3, "abs", err, 0.0, 0)
    return Row("fx", impl, scenario, dtype, 0.0, c, check=check)


@pytest.mark.parametrize("rows, exact", [
    ([row("short", 0.0), row("prompt", 0.0), row("bfloat16", 4e-3, "bfloat16"), row("short", 1e-9, check="grad_x")],
     True),  # only float32 forward rows count
    ([row("short", 0.0), row("prompt", 6e-8)], False),  # one row a rounding off
    ([row("bfloat16", 0.0, "bfloat16")], False),  # no float32 row: nothing to say
    ([row("short", 0.0), row("short", 0.0, impl="y"), row("prompt", 1e-7, impl="y")], True),  # another's rows aside
])  # fmt: skip
def test_bit_exact_counts_every_float32_forward_row(rows, exact):
    v = Verdict("fx", "x", "layer", True)
    assert report.bit_exact(rows, v) is exact
    lines = []
    report.print_report(rows, [v], 1.0, 1, 1, out=lines.append)
    assert v.bit_exact is exact and report.document(rows, [v], 1.0)["verdicts"][0]["bit_exact"] is exact
    assert [x for x in lines if x.startswith("note: x matches")] == ([f"note: x {NOTE.replace('smollm2-135m', 'fx')}"]
                                                                      if exact else [])  # fmt: skip


def test_a_fault_is_never_bit_exact():
    r = row("short", 0.0)
    r.error = "not run: raised ValueError"
    assert not report.bit_exact([r], Verdict("fx", "x", "layer", False, "crash"))


@pytest.mark.slow
def test_code_that_computes_the_reference_passes_with_the_note(tmp_path):
    """A plug-in that imports transformers' LlamaAttention and returns its output: it passes (nothing can stop it)
    and is noted; a built-in beside it is not (none is bit-exact today: `verify --quick`)."""
    out = tmp_path / "v.json"
    p = run(["-m", "harness", "verify", "--fixture", "smollm2-135m", "--quick", "--impl", CHEAT, "naive",
             "--json", str(out)])  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr  # a note, never a failure
    v = {x["impl"]: x for x in json.loads(out.read_text())["verdicts"]}
    assert v[CHEAT]["passed"] and v[CHEAT]["bit_exact"] is True
    assert v["naive"]["passed"] and v["naive"]["bit_exact"] is False
    lines = p.stdout.splitlines()
    table_end = max(i for i, line in enumerate(lines) if line.startswith("smollm2-135m "))
    assert lines[table_end + 1] == f"note: {CHEAT} {NOTE}"  # one line, right after the table
    assert sum(line.startswith("note: ") and "bit for bit" in line for line in lines) == 1
