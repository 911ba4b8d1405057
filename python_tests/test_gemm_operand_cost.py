"""tools/gemm_operand_cost.py, the count behind docs/CUDA.md's case against forming GELU's GEMM
operands on load: its PTX parsing must find all four kernels and count what the activations
make it count, or the doc's table silently counts nothing."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "gemm_operand_cost", os.path.join(ROOT, "tools", "gemm_operand_cost.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def counts(tool):
    return tool.count_ptx()


def test_every_operand_and_activation_is_counted(counts):
    assert set(counts) == {f"{op}<{act}>" for op in ("form_u", "form_dp")
                           for act in ("GELU", "ReLU")}


def test_the_count_sees_the_activations_maths(counts):
    # GELU's erf (and its derivative's exp) reach the special-function unit; ReLU is a compare.
    assert counts["form_u<GELU>"][1] >= 1 and counts["form_dp<GELU>"][1] >= 2
    assert counts["form_u<ReLU>"][1] == 0 and counts["form_dp<ReLU>"][1] == 0
    # the norms' scale and shift and the residual are there for both activations: at least
    # two FMAs and an add
    assert counts["form_u<ReLU>"][0] >= 3
    # erf is a polynomial of many instructions, not one
    assert counts["form_u<GELU>"][0] >= counts["form_u<ReLU>"][0] + 10
    assert counts["form_dp<GELU>"][0] > counts["form_u<GELU>"][0]


def test_the_table_has_a_row_per_model_and_operand(tool, capsys):
    tool.main(["--block-n", "128"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("convmixer_")]
    assert [(r[0], r[1]) for r in rows] == [
        ("convmixer_1536_20", "form_u<GELU>"), ("convmixer_1536_20", "form_dp<GELU>"),
        ("convmixer_768_32", "form_u<ReLU>"), ("convmixer_768_32", "form_dp<ReLU>")]
    # formed C / BLOCK_N times: 1536 / 128 and 768 / 128
    assert [r[2] for r in rows] == ["12x", "12x", "6x", "6x"]
