"""Diagnosis: name the first broken stage, with a hint (layer.py, kernel.py, grad.py), from suspects
(suspects.py) and probes (probes.py) over the evidence (evidence.py)."""
