"""The routed / mixed batch norm with its fused extras, and its synchronized form: schema.py
(the argument struct BnArgs, fakes), eager.py and sync_eager.py (plain PyTorch), triton.py,
triton_backward.py, triton_parts.py and sync_triton.py (Triton kernels and launchers)."""
