"""The catalog of attention bugs, on one textbook pipeline.

    pipeline.py  Llama attention in four stages, each step a swappable function (works in any dtype, float64 too)
    catalog.py   one entry per bug: name, stage, hint, the steps it swaps, held out or not
    mutants.py   the mutation suite: the harness run on every entry, caught and stage scored, held-out apart

The diagnosis builds its suspects from the entries that are not held out; the tests pick entries by name.
"""
