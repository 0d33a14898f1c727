"""`import mlx_dllm` stays instant, `mlx_dllm.convert` stays the function, and the library imports without a cycle."""

import subprocess
import sys

import pytest


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_mlx_dllm_loads_no_heavy_module_and_no_converter():
    heavy = ("mlx", "mlx.core", "mlx_lm", "transformers", "mlx_dllm.convert", "mlx_dllm.loading")
    probe = f"import sys, mlx_dllm; print([m for m in {heavy} if m in sys.modules])"
    assert run_python(probe) == "[]\n"


@pytest.mark.parametrize("first", ["mlx_dllm.convert", "mlx_dllm.convert.common", "mlx_dllm.cli.convert"])
def test_convert_stays_the_function_whatever_imports_its_package_first(first):
    probe = (
        f"import sys, importlib, mlx_dllm; importlib.import_module({first!r}); "
        "print(mlx_dllm.convert is sys.modules['mlx_dllm.convert'].convert, mlx_dllm.convert.__name__)"
    )
    assert run_python(probe) == "True convert\n"


def test_convert_is_the_function_before_its_package_is_imported():
    probe = "import sys, mlx_dllm; f = mlx_dllm.convert; print(f is sys.modules['mlx_dllm.convert'].convert)"
    assert run_python(probe) == "True\n"


@pytest.mark.parametrize(
    "module", ["mlx_dllm.staging", "mlx_dllm.default_model", "mlx_dllm.loading", "mlx_dllm.training.trainer"]
)
def test_library_modules_import_first_without_a_cycle(module):
    assert run_python(f"import {module}; print('ok')") == "ok\n"
