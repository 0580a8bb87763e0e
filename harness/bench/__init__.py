"""`bench`: time, peak memory and memory traffic of attention on Llama-3.2-1B's shapes, forward and backward.

    meter.py           the instrument: bytes at aten op boundaries, tensor bytes alive, resident-set (or CUDA) peak,
                       the clocks (wall clock; CUDA events)
    kernel_traffic.py  the bytes a Triton kernel loads and stores, counted in Triton's interpreter
    triton_traffic.py  the bytes impl/flash_triton.py's forward kernel moves, in closed form
    cases.py           the calls measured (ours and transformers'; forward, and the backward call alone), their
                       FLOPs, the FlashAttention IO model, the Triton kernel's traffic at the bench's shapes
    plan.py            can a configuration run here (memory computed on the meta device, time projected)?
    run.py             measure every planned configuration
    report.py          the table, the targets, the JSON, the figure, the docs block; the command line
    paged.py           `bench --paged`: a paged decode step's traffic against the KV-cache bytes it must read, and
                       its time, for impl.PAGED (docs/bench-paged.md)
    ring.py            `bench --ring`: impl.RING on W rank processes against one (time, memory and bytes sent per
                       rank), and when a ring step's transfer hides under its compute on GPU links (docs/bench-ring.md)
"""
