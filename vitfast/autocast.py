"""Autocast rules: what each vitfast op does inside `torch.autocast`, the same on every backend.

PyTorch's autocast gives each listed ATen op a rule: conv2d, linear, matmul and scaled_dot_product_attention
run in the region's lower-precision dtype (their floating-point inputs are cast to it), layer_norm runs in
float32 on CUDA (CPU autocast leaves it alone: its kernel computes in float32 and returns the input's dtype),
and an op in no list runs in the dtypes it is given. A vitfast op replaces a sequence of such ops, so its rule
is the one that sequence follows; each op's docstring states it.

`register(name, rule)` installs a rule as the kernel of vitfast::name on the AutocastCPU and AutocastCUDA
dispatch keys, above autograd, so the casts are differentiable. It does what `torch.library.register_autocast` does,
except that the rule reads the region's dtype at call time (register_autocast fixes one dtype per device, while
a region may be float16 or bfloat16) and may treat inputs differently (a bias added in float32 is not cast).
The rule runs with autocast disabled on its device, so nothing below it sees autocast: neither the ATen calls
of the torch backend and of the C++ kernels nor the backward ops (autograd runs backward with the autocast
state of the `backward()` call, and backward ops are registered with `keep_dtypes`, which casts nothing).
The C++ kernel ops themselves (csrc/ops.cpp) also run below autocast when called directly.
"""
import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor

_LIB = torch.library.Library("vitfast", "FRAGMENT")
_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}

# rule(device_type, dtype, *op_args) -> the op's outputs; dtype is the region's lower-precision dtype.
Rule = Callable[..., object]


def register(name: str, rule: Rule) -> None:
    """Makes `rule` the autocast kernel of the op vitfast::`name` on CPU and CUDA."""
    for device_type, key in _KEYS.items():
        _LIB.impl(name, _kernel(rule, device_type), key)


def _kernel(rule: Rule, device_type: str) -> Callable:
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return rule(device_type, dtype, *args)
    return kernel


def is_enabled(device: torch.device) -> bool:
    """Whether autocast is on for tensors on `device`: an op's rule then casts its inputs, so the public
    functions accept the mixed dtypes the unfused code accepts there."""
    return device.type in _KEYS and torch.is_autocast_enabled(device.type)


def disabled(device: torch.device) -> ContextManager:
    """A context with autocast off for `device` (nothing to turn off on other devices), for helper math
    that must stay in float32 (e.g. a resampling matrix product standing in for F.interpolate)."""
    return torch.autocast(device.type, enabled=False) if device.type in _KEYS else contextlib.nullcontext()


def cast(dtype: torch.dtype, t: Optional[Tensor]) -> Optional[Tensor]:
    """`t` in `dtype` where autocast would cast it (floating point other than float64), else unchanged."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def check_same_dtype(what: str, **tensors: Optional[Tensor]) -> None:
    """After a rule's casts the named tensors must share one dtype (float64 is never cast, as in autocast).

    Raises:
        ValueError: naming each tensor's dtype.
    """
    present = {k: t for k, t in tensors.items() if t is not None}
    if len({t.dtype for t in present.values()}) > 1:
        listed = ", ".join(f"{k} {t.dtype}" for k, t in present.items())
        raise ValueError(f"vitfast.{what} under autocast: {listed} do not share one dtype after autocast's cast "
                         f"(autocast casts floating-point tensors other than float64)")


def keep_dtypes(op: Callable) -> Rule:
    """The rule of an op that runs in the dtypes it is given (the backward ops): no cast, autocast off below."""
    def rule(device_type, dtype, *args):
        return op(*args)
    return rule


def lower_precision(op: Callable, what: str, names: Sequence[str]) -> Rule:
    """The rule of conv2d, linear and SDPA: every floating-point input (float64 aside) cast to the region's
    dtype. `names` are the op's argument names, for the error message."""
    def rule(device_type, dtype, *args):
        cast_args = tuple(cast(dtype, a) if isinstance(a, Tensor) else a for a in args)
        check_same_dtype(what, **{n: a for n, a in zip(names, cast_args)
                                  if isinstance(a, Tensor) and a.is_floating_point()})
        return op(*cast_args)
    return rule
