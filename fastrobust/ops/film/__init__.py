"""FiLM and channel scale, y = γ[n,c]·x + β[n,c]: schema.py (fakes), eager.py, triton.py;
C++ in csrc/film/. What fastrobust.ops registers for the family is declared here."""
from . import eager, schema

KEY = "film"
OPS = ("film", "film_backward")
FAKES = schema.FAKES
EAGER = {name: eager for name in OPS}
TRITON = {"film": "triton", "film_backward": "triton"}
