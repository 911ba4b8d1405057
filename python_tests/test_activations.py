"""The activation table (convmixer_kernels/activations.py) and what hangs off it.

The Python table and the C++ list (csrc/activation.h) agree; every entry's eager layer and
function compute the same thing; the Triton dispatch computes every entry's maths and refuses a
code the table lacks. Each test runs over the whole table, so a new activation is covered by
adding it there. The C++ and Triton ops refusing an unknown `act` string are in
test_bad_input.py; the CUDA check TUs refusing an unknown code in test_cuda_emulation_{dw,pw}.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from triton_setup import load_kernels

KERNELS, DEVICE = load_kernels()

from convmixer_kernels import _extension  # noqa: E402
from convmixer_kernels.activations import (ACTIVATIONS, NAMES, activation_of_layer,  # noqa: E402
                                           check_act)

SPECS = list(ACTIVATIONS.values())
ids = [a.name for a in SPECS]


def _values(dtype=torch.float64):
    """Both signs, zeros of both signs, large magnitudes and NaN."""
    v = torch.linspace(-6, 6, 97, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, float("nan")],
                           dtype=torch.float64)
    return torch.cat([v, special]).to(dtype)


def test_names_and_codes_match_the_cpp_list():
    assert _extension._C.activation_codes == {a.name: a.code for a in SPECS}
    assert NAMES == tuple(ACTIVATIONS) == tuple(a.name for a in SPECS)
    assert all(name == a.name for name, a in ACTIVATIONS.items())


def test_the_table_is_read_only():
    with pytest.raises(TypeError):
        ACTIVATIONS["silu"] = ACTIVATIONS["gelu"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ACTIVATIONS["gelu"].code = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        ACTIVATIONS["gelu"].module_kwargs["approximate"] = "tanh"  # type: ignore[index]


@pytest.mark.parametrize("act", [None, "GELU", "tanh", "", 0, ["gelu"]])
def test_check_act_names_op_value_and_choices(act):
    with pytest.raises(ValueError) as err:
        check_act("some_op", act)
    assert str(err.value) == f"some_op: act must be one of {NAMES}, got {act!r}"


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_check_act_returns_the_entry(spec):
    assert check_act("op", spec.name) is spec


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_layer_and_functional_agree(spec):
    v = _values()
    layer = spec.layer()
    assert type(layer) is spec.module
    torch.testing.assert_close(layer(v.clone()), spec.functional(v), equal_nan=True, rtol=0,
                               atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_layers_are_recognised(spec):
    assert activation_of_layer(spec.layer()) is spec
    assert activation_of_layer(spec.module) is spec
    assert spec.is_layer(spec.layer())


@pytest.mark.parametrize("layer", [nn.GELU(approximate="tanh"), nn.SiLU(), nn.SiLU, nn.Tanh(),
                                   nn.LeakyReLU(0.1), nn.Identity()], ids=repr)
def test_layers_are_recognised_as_what_they_compute(layer):
    """A layer is taken for the entry that computes its values, and for none when none does
    (GELU's tanh approximation is not the exact GELU)."""
    v = _values()
    got = (layer() if isinstance(layer, type) else layer)(v.clone())
    same = [a for a in SPECS if torch.equal(torch.nan_to_num(a.functional(v), 7.0),
                                            torch.nan_to_num(got, 7.0))]
    spec = activation_of_layer(layer)
    assert spec in same if spec is not None else not same


@pytest.mark.parametrize("spec", [a for a in SPECS if not a.needs_pre_activation],
                         ids=[a.name for a in SPECS if not a.needs_pre_activation])
def test_derivative_follows_from_the_output_where_the_table_says_so(spec):
    """needs_pre_activation=False claims act'(v) is a function of act(v): the derivative at two
    points with the same output (NaN included) is the same."""
    v = _values().requires_grad_()
    out = spec.functional(v)
    (grad,) = torch.autograd.grad(out, v, torch.ones_like(out))
    o, g = out.detach(), grad
    for i in range(len(o)):
        same = (o == o[i]) | (torch.isnan(o) & torch.isnan(o[i]))
        assert torch.all((g[same] == g[i]) | (torch.isnan(g[same]) & torch.isnan(g[i]))), (
            f"{spec.name}: act' differs between inputs with output {float(o[i])}")


# ---------------------------------------------------------------------------------------------
# The Triton dispatch (convmixer_kernels/triton/_activations.py)

needs_triton = pytest.mark.skipif(KERNELS is None, reason=str(DEVICE))


if KERNELS is not None:
    import triton
    import triton.language as tl

    from convmixer_kernels.triton._activations import act_bwd, act_fwd

    @triton.jit
    def _act_kernel(a_ptr, dy_ptr, out_ptr, grad_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        mask = i < n
        a = tl.load(a_ptr + i, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + i, mask=mask, other=0.0)
        tl.store(out_ptr + i, act_fwd(a, ACT), mask=mask)
        tl.store(grad_ptr + i, act_bwd(a, dy, ACT), mask=mask)


def _run_triton(code, a, dy):
    out, grad = torch.empty_like(a), torch.empty_like(a)
    _act_kernel[(1,)](a, dy, out, grad, a.numel(), ACT=code, BLOCK=128)
    return out, grad


@needs_triton
@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_triton_dispatch_computes_each_entry(spec):
    v = _values(torch.float32)
    dy = torch.linspace(-1, 1, v.numel(), dtype=torch.float32)
    out, grad = _run_triton(spec.code, v.to(DEVICE), dy.to(DEVICE))
    v64 = v.double().requires_grad_()
    o64 = spec.functional(v64)
    (g64,) = torch.autograd.grad(o64, v64, dy.double())
    # float32 against float64: a few ulps of erf/exp.
    torch.testing.assert_close(out.cpu().double(), o64.detach(), equal_nan=True, rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), g64, equal_nan=True, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("code", [-1, max(a.code for a in SPECS) + 1])
def test_triton_dispatch_refuses_an_unknown_code(code):
    v = _values(torch.float32).to(DEVICE)
    with pytest.raises(Exception, match="ACT is no code of convmixer_kernels.activations"):
        _run_triton(code, v, v)
