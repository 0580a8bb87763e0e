"""Diagnosis: name the first broken stage, with a hint (layer.py, kernel.py, grad.py; paged.py, varlen.py and
serving.py for the serving contracts), from suspects (suspects.py) and probes (probes.py) over the evidence
(evidence.py)."""
