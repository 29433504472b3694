"""Triton kernels, one op per file. Imported lazily by vitfast.ops: triton is needed only on GPU."""
