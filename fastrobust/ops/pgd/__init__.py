"""The PGD steps (pgd_step, pgd_init, mifgsm_step, in place): schema.py (fakes, modes),
eager.py, triton.py."""
