"""The catalog of attention bugs, on one textbook pipeline.

    pipeline.py  Llama attention in four stages, each step a swappable function (works in any dtype, float64 too)
    mistakes.py  the wrong steps and kernels, one mistake each
    tiled.py     a FlashAttention-2 forward loop with its classic bugs switchable
    backward.py  autograd Functions with a right forward and one mistake in the backward
    catalog.py   one entry per bug: name, stage, hint, the steps it swaps, held out or not
    ring.py      ring attention (context parallelism) in swappable steps; ring_mistakes.py its wrong steps and bugs,
                 ring_catalog.py their entries

The diagnosis builds its suspects from the entries that are not held out; the tests pick entries by name; the
mutation suite (harness/mutants.py) scores the harness on every entry.
"""
