"""vitfast.attention on small random shapes drawn by hypothesis (in a file of its own: a machine without
hypothesis skips these, not the whole of test_attention.py)."""
import pytest
import torch

from test_attention import CASES, MASKS, _check, _shape

hypothesis = pytest.importorskip("hypothesis")
given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies


@st.composite
def _cases(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Nq, Nk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    D = draw(st.sampled_from([16, 24, 40, 64, 80, 96]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    kind, code = draw(st.sampled_from([(None, None)] + MASKS))
    return dict(B=B, H=H, Nq=Nq, Nk=Nk, D=D, dtype=dtype, mask_kind=kind,
                mask_shape=_shape(code, B, H, Nq, Nk) if code else None, is_causal=draw(st.booleans()),
                bias_grad=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.5])),
                dropout_p=draw(st.sampled_from([0.0, 0.0, 0.2])))


@pytest.mark.parametrize("backend,device", CASES)
@settings(max_examples=15, deadline=None, derandomize=True)
@given(case=_cases())
def test_hypothesis_small_shapes(backend, device, case):
    if backend == "cpp":  # no dropout in the C++ kernels: auto mode would pick the torch backend
        case["dropout_p"] = 0.0
    _check(backend, device, **case)
