"""FiLM and channel scale, y = γ[n,c]·x + β[n,c]: schema.py (fakes), eager.py, triton.py."""
