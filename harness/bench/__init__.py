"""`bench`: time, peak memory and memory traffic of attention on Llama-3.2-1B's shapes.

    meter.py   the instrument: bytes at aten op boundaries, tensor bytes alive, resident-set peak
    cases.py   the calls measured (ours and transformers'), their FLOPs and the FlashAttention IO model
    plan.py    can a configuration run here (memory computed on the meta device, time projected)?
    run.py     measure every planned configuration
    report.py  the table, the targets, the JSON, the figure; the command line
"""
