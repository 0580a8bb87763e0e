"""The reference: each family's own transformers attention module, in the dtype and in float64 (attention.py), with
its rotary tables (rope.py) and masks (masks.py); what a family is (family.py); what keeps it float64-faithful
(float64.py)."""

from harness.reference.attention import Reference, Reference64, has_sdpa_path, softcap
from harness.reference.family import hf_config
from harness.reference.masks import additive_mask
from harness.reference.rope import float64_tables

__all__ = ["Reference", "Reference64", "additive_mask", "float64_tables", "has_sdpa_path", "hf_config", "softcap"]
