"""The routed / mixed batch norm with its fused extras, and its synchronized form: schema.py
(the argument struct BnArgs, fakes), eager.py and sync_eager.py (plain PyTorch), triton.py,
triton_backward.py, triton_parts.py and sync_triton.py (Triton kernels and launchers); C++ in
csrc/batch_norm/. What fastrobust.ops registers for the family is declared here."""
from . import eager, schema, sync_eager

KEY = "multi_bn"  # the family's name in fastrobust.backends and `fastrobust info`
OPS = ("multi_bn", "multi_bn_backward", "sync_bn_stats", "sync_bn_apply", "sync_bn_grad_sums",
       "sync_bn_dx")  # the ops with a kernel per backend
FAKES = schema.FAKES
# op -> its eager kernel: the function of the op's name in that module (or the function)
EAGER = {"multi_bn": eager, "multi_bn_backward": eager, **{name: sync_eager for name in OPS[2:]}}
TRITON = {"multi_bn": "triton", "multi_bn_backward": "triton_backward",
          **{name: "sync_triton" for name in OPS[2:]}}  # the module of each Triton launcher
# composites of torch ops (CompositeImplicitAutograd): the backward under create_graph=True
IMPLICIT = {"multi_bn_grads_with_graph": eager.grads_with_graph}
