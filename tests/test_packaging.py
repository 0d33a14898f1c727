"""convert/ and cli/ live at the top of the repo but install as mlx_dllm.convert and mlx_dllm.cli."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_maps_convert_and_cli_into_the_package(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    # A copy, so the build leaves no build/ or *.egg-info in the working tree.
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", "tests", "benchmarks"),
    )
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist"]
    subprocess.run([*build, source], check=True)
    (wheel,) = (tmp_path / "dist").glob("mlx_dllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlx_dllm/convert/__init__.py" in names and "mlx_dllm/convert/dflash.py" in names
    assert "mlx_dllm/cli/__init__.py" in names and "mlx_dllm/cli/generate.py" in names
    assert not [name for name in names if name.split("/")[0] in ("convert", "cli")]
    assert "mlx_dllm/training/trainer.py" in names and "mlx_dllm/cli/train_drafter.py" in names
    for init in (REPO / "mlx_dllm").rglob("__init__.py"):  # every subpackage is declared in pyproject.toml
        assert init.relative_to(REPO).as_posix() in names, init
    data = [*(REPO / "mlx_dllm" / "drafters").glob("*/*"), *(REPO / "mlx_dllm" / "kernels").glob("*.metal")]
    assert data, "the default model's drafter and the Metal kernel sources travel with the package"
    for file in data:
        assert file.relative_to(REPO).as_posix() in names, file
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "mlx-dllm = mlx_dllm.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_imports_convert_and_cli(tmp_path):
    # Run outside the repo so that the import comes from the installed (editable or not) package.
    code = (
        "import sys, mlx_dllm.convert, mlx_dllm.cli; "
        "print(sys.modules['mlx_dllm.convert'].__file__, mlx_dllm.cli.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    if "No module named 'mlx_dllm'" in result.stderr:
        pytest.skip("mlx-dllm is not installed in this environment")
    assert result.returncode == 0, result.stderr
    convert_file, cli_name = result.stdout.split()
    assert Path(convert_file).parent.name == "convert" and cli_name == "mlx_dllm.cli"


def test_console_script_runs():
    script = Path(sys.executable).parent / "mlx-dllm"
    if not script.exists():
        pytest.skip("the mlx-dllm console script is not installed beside this python")
    result = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("mlx-dllm, version "), result.stderr
