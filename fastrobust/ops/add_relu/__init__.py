"""relu(a + b), the residual join: schema.py (the entry point), eager.py, triton.py; its CPU
kernel and composite are C++ (csrc)."""
