"""The import graph of harness/ and impl/ (scripts/import_graph.py) against the intended layering, over the tree as it
is; the checker itself on a small tree with one violation of each kind; and a command line whose output starts with
its own table, no dependency warning before it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ig = _load_import_graph()


@pytest.fixture(scope="module")
def graph():
    return ig.build(ROOT)


def _listing(title: str, lines: list[str]) -> str:
    return (f"{title}: {len(lines)}; offending modules: {', '.join(ig.offending_modules(lines))}\n  "
            + "\n  ".join(lines))


# ---- the rules, over the current tree ----


def test_no_import_cycles(graph):
    found = [" -> ".join(c) for c in ig.cycles(graph)]
    assert not found, _listing("import cycles among project modules (in-function imports marked # lazy: excluded)",
                               found)


def test_no_import_up_the_layers(graph):
    found = ig.layer_violations(graph)
    assert not found, _listing("imports from a lower layer up to a higher one (scripts/import_graph.py LAYERS)", found)


def test_no_private_name_imported_from_another_module(graph):
    found = ig.private_imports(graph)
    assert not found, _listing("private names (leading underscore) imported from another project module", found)


def test_every_in_function_import_says_why(graph):
    found = ig.unmarked_local_imports(graph)
    assert not found, _listing("in-function imports without a trailing `# lazy: <why>`", found)


def test_no_module_over_the_line_limit(graph):
    found = ig.long_files(graph)
    assert not found, _listing(f".py files under harness/ or impl/ over {ig.MAX_LINES} lines", found)


def test_the_graph_sees_the_tree(graph):
    """The checks above pass vacuously on an empty graph: this one cannot."""
    assert {"impl", "impl.naive", "harness.cli", "harness.common", "harness.verify.run"} <= set(graph.modules)
    edges = {(e.src, e.target) for e in graph.edges()}
    assert ("harness.__main__", "harness.cli") in edges  # module-level
    assert ("harness.cli", "harness.verify.run") in edges  # cli's command table (importlib.import_module)
    assert ("impl.naive", "impl.masks") in edges or ("impl.naive", "impl.projection") in edges
    for m in graph.modules:
        assert ig.layer_of(m) is not None or m == "harness", f"{m} is in no layer of LAYERS"


# ---- the checker, on a tree made to break every rule once ----

SMALL_TREE = {
    "impl/__init__.py": "",
    "impl/core.py": "def attend():\n    return 1\n",
    "impl/bad.py": "from harness.common import helper\n",  # impl imports harness: up the layers
    "harness/__init__.py": "",
    "harness/common.py": "def helper():\n    return 2\n\n\ndef _secret():\n    return 3\n",
    "harness/versions.py": "from harness.common import helper\n",  # leaves import none of each other
    "harness/verify/__init__.py": "",
    "harness/verify/a.py": "from harness.verify import b\nfrom harness.common import _secret\n",
    "harness/verify/b.py": (
        "from harness.verify.a import *  # noqa\n"  # a <-> b: a cycle
        "\n\ndef f():\n    from impl.core import attend  # lazy: only f needs it\n    import json\n    return attend\n"
    ),
    "harness/verify/c.py": "def g():\n    from harness.verify import a  # lazy: breaks nothing\n",
    "harness/verify/d.py": "from harness.verify import c\n",  # d -> c, c -> a only lazily: no cycle
    "harness/verify/long.py": "x = 1\n" * (ig.MAX_LINES + 1),
}


@pytest.fixture
def small(tmp_path):
    for rel, text in SMALL_TREE.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return ig.build(tmp_path)


def test_checker_finds_each_kind_of_violation(small):
    found = ig.violations(small)
    assert found["cycles"] == ["harness.verify.a -> harness.verify.b -> harness.verify.a"]
    assert [v.split(" ")[0] for v in found["layers"]] == ["impl.bad:1", "harness.versions:1"]
    assert "layer 0 (impl) up to layer 1 (harness.common)" in found["layers"][0]
    assert found["private"] == ["harness.verify.a:2 imports _secret from harness.common"]
    assert found["unmarked"] == ["harness.verify.b:6 imports json in a function"]  # the marked ones pass
    assert found["long_files"] == [f"harness.verify.long (harness/verify/long.py): {ig.MAX_LINES + 1} lines"]
    assert ig.offending_modules(found["cycles"] + found["private"]) == ["harness.verify.a", "harness.verify.b"]


def test_checker_reads_lazy_marks(small):
    lazy = {(i.src, i.target): i.lazy for i in small.imports if i.in_function}
    assert lazy[("harness.verify.b", "impl.core")] == "only f needs it"
    assert lazy[("harness.verify.c", "harness.verify.a")] == "breaks nothing"
    assert lazy[("harness.verify.b", "json")] is None
    # the lazy import c -> a is an edge (the layering sees it) but no part of a cycle
    assert ("harness.verify.c", "harness.verify.a") in {(e.src, e.target) for e in small.edges()}
    assert ("harness.verify.c", "harness.verify.a") not in {(e.src, e.target) for e in small.edges(lazy=False)}


def test_the_picture_is_drawn(small, tmp_path):
    out = ig.render(small, tmp_path / "imports.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- no dependency warning before the table ----


def test_cli_filters_only_the_known_dependency_warnings(monkeypatch):
    from harness import cli

    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.quiet_dependency_warnings()
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                      "`LlamaAttention.forward`. Use `cache` instead.", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)  # not ours to hide
        warnings.warn("`past_key_values` is deprecated and will be removed in version 9", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else is deprecated",
                                              "`past_key_values` is deprecated and will be removed in version 9"]


def test_cli_filter_steps_aside_for_warning_options(monkeypatch):
    from harness import cli

    monkeypatch.setattr(sys, "warnoptions", ["default"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.quiet_dependency_warnings()
        warnings.warn("`x` is deprecated and will be removed in version 1", FutureWarning, stacklevel=1)
    assert len(seen) == 1


@pytest.mark.slow
def test_verify_prints_no_warning_before_its_table():
    """A real interpreter with its default warning filters (no -W, no PYTHONWARNINGS), as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, "-m", "harness", "verify", "--impl", "naive", "--fixture", "smollm2-135m",
                        "--quick", "--dtype", "float32"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    warned = [line for line in p.stderr.splitlines() if "Warning" in line]
    assert not warned, "\n".join(warned)
    # the table first; only the one-line note that the installed transformers is not the tested one may precede it
    lines = p.stdout.splitlines()
    first = lines[1] if lines and lines[0].startswith("note: this project's verdicts were made with") else lines[0]
    assert first.startswith("fixture "), p.stdout[:300]
