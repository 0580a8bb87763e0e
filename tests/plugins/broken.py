"""The catalog's bugs as plug-in functions of the layer contract, one module attribute per bug, for tests and
examples that name a plug-in by file (`tests/plugins/broken.py:gqa_repeat`). Nothing is written here: every bug
lives in harness/bugs/catalog.py."""

from harness.bugs.catalog import CATALOG

globals().update({b.name: b.layer() for b in CATALOG})
