"""`e2e`: a whole real model with the implementation in every layer's self_attn, against transformers.

    model.py    the model (SmolLM2 or Gemma 3 270M from its GGUF, the Hub, a directory), float32, cached
    gguf_check.py  Gemma 3 270M's config as transformers read it, against the GGUF's metadata
    swap.py     the module that stands in for each layer's self_attn
    prompts.py  the prompts (defaults or a file) -> one left-padded batch
    infer.py    inference: reference logits and greedy tokens -> the swapped model's -> a result per prompt
    pages.py    --paged: the harness's page allocator and cache writes (a pool per layer, NaN where no token is)
    paged.py    --paged: the model served through a paged kernel, prefill then decoding, judged step by step
    paged_verdict.py  --paged: the first step and layer that differ from transformers, and what differs
    train.py    --train: loss and every parameter's gradient, then optimizer steps, against transformers
    report.py   the tables, the training lines, the JSON of every mode
    run.py      the command line of every mode
    plot.py     `plot`: one layer's attention probabilities, ours beside transformers'
"""
