"""The PGD steps (pgd_step, pgd_init, mifgsm_step, in place): schema.py (fakes, modes),
eager.py, triton.py, functional.py (the public steps); C++ in csrc/pgd/. What fastrobust.ops
registers for the family is declared here."""
from . import eager, schema

KEY = "pgd"
OPS = ("pgd_step", "pgd_init", "mifgsm_step")
FAKES = schema.FAKES
EAGER = {name: eager for name in OPS}
TRITON = {name: "triton" for name in OPS}
