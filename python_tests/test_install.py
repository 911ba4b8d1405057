"""The README's commands work from the repository root and from anywhere else, and a missing
extension says how to build it."""
import os
import shutil
import subprocess
import sys

import pytest

import convmixer_kernels

PACKAGE = os.path.dirname(os.path.abspath(convmixer_kernels.__file__))
ROOT = os.path.dirname(PACKAGE)
IN_CHECKOUT = os.path.exists(os.path.join(ROOT, "setup.py"))


def _run(args, cwd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("PYTHONPATH", None)  # as a user's shell has it: no help finding the package
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(not IN_CHECKOUT, reason="the package is not imported from a checkout")
@pytest.mark.parametrize("where", ["root", "elsewhere"])
@pytest.mark.parametrize("command", [
    ["-c", "import convmixer_kernels as ck; print(ck.available_backends())"],
    ["-m", "convmixer_kernels.bench", "--help"],
    ["-m", "convmixer_kernels.train", "--help"],
    ["-m", "convmixer_kernels.roofline", "--ledger", "--model", "convmixer_1536_20"],
])
def test_readme_commands_run_from_the_root_and_elsewhere(tmp_path, where, command):
    done = _run(command, cwd=ROOT if where == "root" else tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not IN_CHECKOUT, reason="the package is not imported from a checkout")
def test_pytest_collects_from_the_root():
    done = _run(["-m", "pytest", "--collect-only", "-q", "python_tests/test_docs.py",
                 "-p", "no:cacheprovider"], cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_a_missing_extension_says_how_to_build_it(tmp_path):
    # A copy of the package with no built extension, in a tree that looks like a checkout:
    # what `python ...` from the root of a clone meets after a non-editable `pip install .`.
    shutil.copytree(PACKAGE, tmp_path / "convmixer_kernels",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    (tmp_path / "setup.py").write_text("")
    # Loaded by path, with an editable install's import hook out of the way: it would find the
    # real package (and its _C) by name.
    init = tmp_path / "convmixer_kernels" / "__init__.py"
    script = ("import importlib.util, sys\n"
              "sys.meta_path[:] = [f for f in sys.meta_path\n"
              "                    if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
              f"spec = importlib.util.spec_from_file_location('convmixer_kernels', {str(init)!r},"
              f" submodule_search_locations=[{str(init.parent)!r}])\n"
              "module = importlib.util.module_from_spec(spec)\n"
              "sys.modules['convmixer_kernels'] = module\n"
              "spec.loader.exec_module(module)\n")
    done = _run(["-c", script], cwd=tmp_path)
    assert done.returncode != 0
    assert "the native extension _C is missing" in done.stderr
    assert "pip install --no-build-isolation -e ." in done.stderr
    assert "source tree" in done.stderr
