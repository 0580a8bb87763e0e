"""`verify`: does an implementation match transformers' LlamaAttention? The pipeline, in the order it runs:

    scenarios.py  identical, seeded inputs for every implementation (lengths, padding, positions, dtypes)
    reference.py  transformers' LlamaAttention on them, in the scenario's dtype and in float64
    run.py        each implementation on the same inputs; the rows and verdicts
    compare.py    the tolerance policy: 1e-3 in float32, the FlashAttention rule in half precision
    diagnose.py   for a failing implementation, the first broken stage and a hint
    report.py     the table, the verdict lines, the JSON
"""
