"""From-scratch attention, as it runs in Llama-3.2-1B. Never imports transformers.

The plug-in contract (every entry of IMPLEMENTATIONS follows it; the harness accepts any callable that does):

    attention(x, weights, *, config, position_ids, attention_mask=None) -> Tensor
      x              [batch, seq, hidden_size], float32 / bfloat16 / float16
      weights        dict, nn.Linear layout [out, in], dtype of x: "q_proj" [H*d, hidden], "k_proj" [Hkv*d, hidden],
                     "v_proj" [Hkv*d, hidden], "o_proj" [hidden, H*d]
      config         dict: hidden_size, num_attention_heads, num_key_value_heads, head_dim, rope_parameters
                     (transformers 5 form)
      position_ids   int64 [batch, seq], any values (contiguous, offset, restarting, sparse)
      attention_mask None or [batch, seq] of 1 = token, 0 = padding
      returns        [batch, seq, hidden_size], dtype of x: causal self-attention with RoPE, no bias, no dropout

Pieces, one concept per file: rope (frequencies, tables, both pairings), gqa (repeat_kv, grouping), masks,
projection (stage 1 and the output projection), naive, loop, tiled (FlashAttention-2 style), sdpa, decode
(KV cache).
"""

from impl import loop, naive, sdpa, tiled

IMPLEMENTATIONS = {
    "naive": naive.attention,
    "loop": loop.attention,
    "tiled": tiled.attention,
    "sdpa": sdpa.attention,
}

# core(q, k, v, attention_mask) -> context: the part between projection and output projection, for decoding.
CORES = {"naive": naive.core, "loop": loop.core, "tiled": tiled.core, "sdpa": sdpa.core}

__all__ = ["IMPLEMENTATIONS", "CORES"]
