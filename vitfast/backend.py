"""Backend choice: which implementation of an op runs for a given set of input tensors.

Backends: "triton" (Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cuda" (the extension's
CUDA kernels), "cpp" (the extension's CPU kernels), "onednn" (oneDNN's primitives as PyTorch ships them,
torch.ops.mkldnn: CPU tensors, where PyTorch was built with oneDNN and torch.backends.mkldnn.enabled), "torch" (the
plain PyTorch reference). By default CUDA tensors go to each op's GPU preference order and CPU tensors to the op's
CPU order ("cpp" then "torch" unless the op says otherwise). `VITFAST_BACKEND=<name>` or `use_backend(name)` forces
one backend; a forced backend that cannot take the inputs raises, it never falls back silently (an op registered with
`obeys`, vitfast.linear, which has no kernel of vitfast's, leaves its choice automatic under the other backends: a
forced triton, cuda or cpp).
"""
import contextlib
import functools
import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.autograd.forward_ad as fwAD

from vitfast import _ext

log = logging.getLogger("vitfast.backend")

BACKENDS = ("triton", "cuda", "cpp", "onednn", "torch")

# reason(backend, tensors) -> None if the backend takes these inputs, else why it does not.
SupportCheck = Callable[[str, tuple], Optional[str]]


@dataclass(frozen=True)
class OpSpec:
    gpu_order: tuple  # preference on CUDA tensors
    cpu_order: tuple  # preference on CPU tensors
    check: SupportCheck
    obeys: tuple  # the forced backends the op runs; under another one its choice stays automatic


_OPS: dict = {}
# What forced_backend reads (a plain string, which torch.compile guards on): the newest open use_backend block's name,
# else set_backend's; None defers to VITFAST_BACKEND. "auto" is the automatic choice whatever that variable says.
_forced: Optional[str] = None
_set: Optional[str] = None  # set_backend's name
_blocks: list = []  # [token, name] of the open use_backend blocks, in any thread, oldest first
_blocks_lock = threading.Lock()


def register_op(op: str, *, gpu_order=("triton", "cuda", "torch"), cpu_order=("cpp", "torch"),
                check: SupportCheck = lambda backend, tensors: None, obeys: tuple = BACKENDS) -> None:
    """Declares which backends implement `op`, in order of preference, what each accepts, and which forced backends
    the op obeys (by default all: under one it does not implement it raises)."""
    for b in gpu_order + cpu_order + tuple(obeys):
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for op {op!r}; expected one of {BACKENDS}")
    _OPS[op] = OpSpec(tuple(gpu_order), tuple(cpu_order), check, tuple(obeys))


def _interpret_requested() -> bool:
    """Triton's own reading of TRITON_INTERPRET (1, true, yes, on: it interpreted under TRITON_INTERPRET=true where
    this said no). Unset, 0 or 1 are read here (no call into triton's knobs on the common path, which each backend
    choice takes)."""
    value = os.environ.get("TRITON_INTERPRET", "0")
    if value in ("0", "1", ""):
        return value == "1"
    if has_triton():
        import triton

        knobs = getattr(triton, "knobs", None)  # (triton >= 3.4)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    return value.lower() in ("true", "yes", "on")


_triton_compiled: Optional[bool] = None  # (Triton's mode, once it is imported)


def _triton_compiled_at_import() -> bool:
    """Whether Triton was imported without TRITON_INTERPRET: its own @triton.jit helpers (tl.sum, tl.max, ...) are
    then compiled functions, which an interpreted kernel cannot call ("Cannot call @triton.jit'd outside of the
    scope of a kernel"), whatever the variable says later. False while Triton is not imported."""
    global _triton_compiled
    if _triton_compiled is None:
        standard = sys.modules.get("triton.language.standard")
        if standard is None:
            return False
        from triton.runtime.interpreter import InterpretedFunction

        _triton_compiled = not isinstance(standard.sum, InterpretedFunction)
    return _triton_compiled


def triton_interpret() -> bool:
    """Whether Triton interprets vitfast's kernels: TRITON_INTERPRET asks for it (`_interpret_requested`) and Triton
    was imported under it (`import vitfast` imports Triton, through torch._dynamo)."""
    return _interpret_requested() and not _triton_compiled_at_import()


# Set by vitfast.triton.common.compile_only: CPU tensors then stand in for a GPU's and Triton only compiles.
_triton_compile_only = False


def triton_takes_cpu() -> bool:
    """Whether the triton backend takes CPU tensors: run by the interpreter, or compiled only."""
    return triton_interpret() or _triton_compile_only


@functools.lru_cache(None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# (read once here: torch.compile cannot trace torch.backends.mkldnn.is_available, which the ops' choices would call)
_HAS_ONEDNN_OPS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_NAMES = BACKENDS + ("auto",)


def _check_name(name: str) -> str:
    if name not in _NAMES:
        raise ValueError(f"unknown vitfast backend {name!r}; expected one of {_NAMES}")
    return name


def _refresh() -> None:
    global _forced
    _forced = _blocks[-1][1] if _blocks else _set


_COMPILING = ("vitfast.{} inside a function that torch.compile traces would not reach vitfast's ops, which choose "
              "their backend when the compiled graph runs: call it around the compiled call")


def set_backend(name: Optional[str]) -> None:
    """Forces `name` for every op ("auto": the automatic choice, whatever VITFAST_BACKEND says; None: back to
    VITFAST_BACKEND, automatic where it is unset). An open use_backend block takes precedence.

    Raises:
        ValueError: a name that is not one of BACKENDS, "auto" or None.
        RuntimeError: called inside a function that torch.compile traces (as use_backend).
    """
    global _set
    if torch.compiler.is_compiling():
        raise RuntimeError(_COMPILING.format(f"set_backend({name!r})"))
    with _blocks_lock:
        _set = None if name is None else _check_name(name)
        _refresh()


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager that forces one backend ("auto": the automatic choice, whatever set_backend or
    VITFAST_BACKEND say), e.g. `with vitfast.use_backend("triton"): ...`. The choice is process-wide, as the
    backward passes that autograd runs in its own threads need: while blocks of several threads are open, the one
    entered last rules; leaving a block removes its own choice only, so the choice goes back to the blocks still
    open, then to set_backend's. None: VITFAST_BACKEND's choice (automatic where it is unset). A compiled graph
    runs the ops on the choice in force when it runs (dynamo guards on it): open the block around the call of a
    torch.compile'd function, not inside it.

    Raises:
        ValueError: a name that is not one of BACKENDS, "auto" or None.
        RuntimeError: the block is entered inside a function that torch.compile traces: vitfast's ops choose their
            backend when the compiled graph runs, and dynamo replays the block's setting and restoring around the
            graph, so it would not reach them. Dynamo takes the error as a graph break: without fullgraph the
            function runs uncompiled from there (the block then works); with fullgraph=True compiling fails
            (dynamo's "Observed exception", with this message in its debug context).
    """
    name = None if name is None else _check_name(name)
    if torch.compiler.is_compiling():
        raise RuntimeError(_COMPILING.format(f"use_backend({name!r})"))
    token = [object(), name]
    with _blocks_lock:
        _blocks.append(token)
        _refresh()
    try:
        yield
    finally:
        with _blocks_lock:
            _blocks.remove(token)
            _refresh()


def forced_backend() -> Optional[str]:
    """The backend every op must run (use_backend, set_backend, else VITFAST_BACKEND), or None: the automatic choice.

    Raises:
        ValueError: VITFAST_BACKEND names no backend (read here, at each choice, so it may change at run time;
            the ops choose inside their torch.library implementations, which a compiled graph calls, so they obey
            a later value, but a choice made in code dynamo traces, as the patched modules' Python, keeps the value
            of its tracing: dynamo guards on use_backend's and set_backend's choice, not on the environment).
    """
    name = _forced
    if name is None:
        name = os.environ.get("VITFAST_BACKEND") or "auto"  # (set but empty: auto)
        if name not in _NAMES:
            raise ValueError(f"VITFAST_BACKEND={name!r} is not a vitfast backend; expected one of {_NAMES}")
    return None if name == "auto" else name


def forced_for(op: str) -> Optional[str]:
    """`forced_backend()` where `op` obeys it (register_op's `obeys`), else None: the op's automatic choice."""
    forced = forced_backend()
    return forced if forced in _OPS[op].obeys else None


def _unavailable(op: str, backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run `op` on `device` at all (None when it can)."""
    spec = _OPS[op]
    # (a Triton kernel runs CPU tensors under the interpreter: triton is in each CPU order, so that a CPU tensor
    # without TRITON_INTERPRET=1 gets that reason below)
    order = spec.gpu_order if device.type == "cuda" else spec.cpu_order + tuple(b for b in spec.gpu_order
                                                                                 if b == "triton")
    if backend not in order:
        if backend not in spec.gpu_order + spec.cpu_order:
            return f"{op} has no {backend} implementation"
        return f"{op} has no {backend} implementation for {device.type} tensors"
    if backend == "triton":
        if not has_triton():
            return "triton is not installed"
        if device.type == "cpu" and not triton_takes_cpu():
            if _interpret_requested():
                return ("Triton runs CPU tensors only under TRITON_INTERPRET=1, set before Triton is imported (by "
                        "`import vitfast`, or torch._dynamo): it was set later, and Triton's own helpers are compiled")
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if backend in ("cpp", "cuda"):
        if not _ext.HAS_EXT:
            return _ext.EXT_ERROR
        if backend == "cuda" and not _ext.EXT_CUDA:
            return "vitfast._C was built without CUDA"
    if backend == "onednn":
        if not _HAS_ONEDNN_OPS:
            return "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
        if not torch.backends.mkldnn.enabled:
            return "oneDNN is switched off (torch.backends.mkldnn.enabled is False)"
    return None


def functorch_grad_active() -> bool:
    """Whether a torch.func gradient transform (grad, vjp, jacrev, ...) is running: the ops' autograd, a
    torch.library registration, does not run under them."""
    if torch.compiler.is_compiling():  # dynamo does not trace the query (and traces torch.func itself)
        return False
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(level.key() == torch._C._functorch.TransformType.Grad for level in stack)


def forward_ad_open() -> bool:
    """Whether a forward-mode AD level is open (torch.autograd.forward_ad.dual_level, torch.func.jvp), under which
    vitfast's ops would drop tangents."""
    return fwAD._current_level >= 0


def transforms_open() -> bool:
    """Whether a torch.func gradient transform or a forward-mode AD level is open: vitfast's ops do not run under
    either, so patched modules run their original code (functorch_grad_active, forward_ad_open)."""
    return functorch_grad_active() or forward_ad_open()


def has_dtensor(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether one of `tensors` is a DTensor (tensor parallelism), which vitfast's ops have no sharding rules for.
    torch.distributed.tensor is looked up, not imported (importing it takes about a second): it is imported wherever
    a DTensor exists."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(t, dtensor.DTensor) for t in tensors)


def check_transforms(op: str, *tensors: Optional[torch.Tensor]) -> None:
    """vitfast's ops have reverse-mode autograd through torch.autograd only: a torch.library op given an input with
    a forward-mode tangent (torch.func.jvp, torch.autograd.forward_ad) would drop it without a word (jvp returns
    zeros), and under torch.func's gradient transforms (grad, vjp, jacrev) its registered autograd fails with an
    internal error. Each public op calls this first (vmap runs: per-sample loops through PyTorch's fallback).

    Raises:
        NotImplementedError: an input carries a forward-mode tangent, or a torch.func gradient transform is active.
    """
    if functorch_grad_active():
        raise NotImplementedError(
            f"vitfast.{op} does not run under torch.func's gradient transforms (grad, vjp, jacrev): its autograd is "
            f"registered for torch.autograd only; use backward() / torch.autograd.grad, or the plain PyTorch "
            f"reference (vitfast.ops.*_ref). (Models patched by vitfast.patch_model run their original code there.)")
    if not forward_ad_open():  # no tensor can carry a tangent
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"vitfast.{op} has no forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): its inputs carry "
            f"tangents it would drop; use reverse mode (backward(), torch.autograd.grad) or the plain PyTorch "
            f"reference (vitfast.ops.*_ref)")


def no_double_backward(op: str, backward_op) -> None:
    """Gives `backward_op` (the torch.library op that `op`'s backward calls) an autograd formula that raises:
    vitfast has no second-order gradients, and without a formula PyTorch's error would name the internal op and
    ask for register_autograd. A first backward with create_graph=True still runs; differentiating its result
    raises."""
    def _backward(ctx, *grads):
        raise NotImplementedError(
            f"vitfast.{op} has no double backward (differentiating its gradient, e.g. a gradient penalty through "
            f"torch.autograd.grad(..., create_graph=True)): use the plain PyTorch reference (vitfast.ops.*_ref), "
            f"or vitfast.unpatch_model on a patched model")

    backward_op.register_autograd(_backward, setup_context=lambda ctx, inputs, output: None)


def save_for_backward(ctx, *tensors: Optional[torch.Tensor]) -> None:
    """ctx.save_for_backward for the ops' setup_context, with the tensors made under torch.inference_mode (a frozen
    backbone's features, a mask built there), which autograd refuses to save, replaced by normal copies: a module
    whose first step makes new tensors of them (torchvision's PatchMerging slices and concatenates) trains on them,
    and so does its fused op now."""
    ctx.save_for_backward(*(t.clone() if t is not None and t.is_inference() else t for t in tensors))


def output_view(t: torch.Tensor, shape) -> torch.Tensor:
    """`t.view(shape)` (t contiguous) as an op's output: an alias autograd does not track as a view (ATen's
    _unsafe_view, as torch.matmul returns its folded products). An op's output that is a view of a buffer made in
    the op cannot be modified in place under autograd ("a function that returns multiple views")."""
    return torch.ops.aten._unsafe_view(t, shape)


def check_op_shapes(op: str, expected: dict) -> None:
    """For an op called directly (torch.ops.vitfast.<op>, whose public function checks more): `expected` maps each
    argument's name to (tensor or None, the shape the kernels index it by); a Triton kernel would read or write past
    a tensor of another shape.

    Raises:
        ValueError: naming each tensor whose shape differs, with the shape expected.
    """
    bad = [f"{name} {tuple(t.shape)} (expected {tuple(shape)})" for name, (t, shape) in expected.items()
           if t is not None and tuple(t.shape) != tuple(shape)]
    if bad:
        raise ValueError(f"vitfast::{op}: shapes do not agree: {'; '.join(bad)}")


def draw_seed(fn: str, dropout_p: float) -> Optional[torch.Tensor]:
    """The dropout seed of the ops that take one (attention, rel_pos_attention, window_attention), for the public
    function `fn`: a (1,) int64 CPU tensor drawn from torch's default CPU generator (so torch.manual_seed reproduces
    it) where dropout_p > 0, else None. A tensor, not a Python int, so that torch.jit.trace and torch.export draw it
    anew at each call.

    Raises:
        ValueError: dropout_p outside [0, 1).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"vitfast.{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    return torch.randint(0, 2**62, (1,), dtype=torch.int64) if dropout_p > 0 else None


def seed_value(op: str, seed: Optional[torch.Tensor], dropout_p: float) -> int:
    """The value of an op's dropout seed (`draw_seed`), checked where the op is called directly; 0 without dropout.

    Raises:
        ValueError: dropout_p outside [0, 1) (the torch backends returned NaN at 1), dropout_p > 0 without a seed, or
            a seed that is not a (1,) int64 CPU tensor.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"vitfast::{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if seed is None:
        if dropout_p > 0:
            raise ValueError(f"vitfast::{op}: dropout_p {dropout_p} > 0 needs a seed, a (1,) int64 CPU tensor")
        return 0
    if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device.type != "cpu":
        raise ValueError(f"vitfast::{op}: seed must be a (1,) int64 CPU tensor, got {tuple(seed.shape)} {seed.dtype} "
                         f"on {seed.device}")
    return int(seed.item())


def why_not(op: str, backend: str, *tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why `backend` cannot run `op` for these tensors (None entries are ignored), whatever backend is forced; None
    when it can."""
    present = tuple(t for t in tensors if t is not None)
    return _unavailable(op, backend, present[0].device) or _OPS[op].check(backend, present)


def choose_backend(op: str, *tensors: Optional[torch.Tensor], skip: tuple = ()) -> str:
    """Returns the backend that runs `op` for these tensors (None entries are ignored). skip: backends the automatic
    choice passes over for this call (an op's own rule, e.g. oneDNN below the size where it pays: linear and
    linear_gelu apply `onednn_pays` themselves, so without skip the answer for them is the backend that can take
    the tensors, not the one a call of that size runs); a forced backend the op obeys (register_op's `obeys`)
    ignores it.

    Raises:
        ValueError: an unknown op, no tensor, or when the forced backend, or every backend, cannot take the inputs.
    """
    if op not in _OPS:
        raise ValueError(f"vitfast.choose_backend: unknown op {op!r}; expected one of {sorted(_OPS)}")
    spec = _OPS[op]
    present = tuple(t for t in tensors if t is not None)
    if not present:
        raise ValueError(f"vitfast.choose_backend({op!r}): give the op's input tensors (the choice depends on them)")
    forced = forced_for(op)
    if forced:
        candidates = (forced,)
    else:
        order = spec.gpu_order if present[0].device.type == "cuda" else spec.cpu_order
        candidates = tuple(b for b in order if b not in skip)
        for backend in set(order) & set(skip):
            log.debug("%s: %s backend skipped: passed over by the op's own rule for this call", op, backend)
    reasons = []
    for backend in candidates:
        reason = why_not(op, backend, *present)
        if reason is None:
            log.debug("%s: %s backend chosen%s", op, backend, " (forced)" if forced else "")
            return backend
        log.debug("%s: %s backend skipped: %s", op, backend, reason)
        reasons.append(f"{backend}: {reason}")
    # (the ops that take a dropout seed pass it last: drawn by vitfast, it is not one of the caller's inputs)
    inputs = present[:-1] if len(present) > 1 and present[-1].dtype == torch.int64 else present
    shapes = ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in inputs)
    raise ValueError(f"vitfast.{op}: no backend can take inputs [{shapes}]"
                     f"{' (forced ' + repr(forced) + ')' if forced else ''}; " + "; ".join(reasons))
