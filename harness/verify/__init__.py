"""`verify`: does an implementation match transformers' attention? In the order it runs:

    run.py          the command line; verify(): fixtures and implementations -> the loop
    loop.py         the one check loop: (contract, target, implementation) -> rows -> verdict; faults, timing
    contracts/      one module per contract (layer, module, core, and their gradients; paged, varlen): cases,
                    reference, call, comparison, diagnosis hooks
    scenarios.py    a layer's seeded inputs (lengths, padding, positions, dtypes); kernels.py the kernel matrix,
                    kernel_hf.py its reference (transformers' functions for windows, softcapping, sinks);
                    paged_cases.py, varlen_cases.py the serving matrices (a KV cache in pages, packed batches)
    grads.py        transformers' gradients through autograd and the gradient rule
    compare.py      the tolerance policy: 1e-3 in float32, the FlashAttention rule in half precision
    diagnosis/      for a failing implementation, the first broken stage and a hint
    plugins.py  specs.py  worker.py     the implementations under test and the process boundary
    records.py  report.py  plot.py  listing.py     rows and verdicts; the table, the JSON, the pictures, `list`
    drift.py  ci_output.py  reference drift and --accept-reference; --junit, GitHub's step summary and annotations
"""
