"""`e2e`: a whole real model with the implementation in every layer's self_attn, against transformers.

    model.py  the model (SmolLM2 from its GGUF, the Hub, a directory), float32, cached
    swap.py   the module that stands in for each layer's self_attn
    run.py    prompts -> reference logits and greedy tokens -> the swapped model's -> report
    plot.py   `plot`: one layer's attention probabilities, ours beside transformers'
"""
