"""Verification harness for attention implementations against transformers' LlamaAttention."""
