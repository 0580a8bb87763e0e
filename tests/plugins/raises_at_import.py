"""A plug-in whose import raises: a verdict for it alone; the others are judged (tests/test_isolation.py)."""

raise ImportError("this plug-in needs a library that is not installed")
