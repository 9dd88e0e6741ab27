"""Triton kernels, one file per op family (imported lazily by fastrobust.backends, so the
package works where triton is missing)."""
