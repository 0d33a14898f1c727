"""`mlx-dllm benchmark`: end to end on tiny random models of each family, the identical-output check, the plot,
flag errors, the shipped prompt sets, and the BLAS detection and re-exec decision (no timing asserted)."""

import json
import sys

import pytest
from click.testing import CliRunner

from mlx_dllm import blas
from mlx_dllm.benchmark import runner
from mlx_dllm.benchmark.prompts import BUILT_IN, read_prompts
from mlx_dllm.cli import main
from mlx_dllm.sampler.mode import all_modes

QUICK = ["--num-prompts", "1", "--max-tokens", "6", "--repeats", "1"]
JSON_KEYS = {"benchmark", "model", "methods", "outputs_match", "mismatches", "blas", "device", "max_tokens", "repeats"}
ROW_KEYS = {
    "generation_tps",
    "prompt_tps",
    "tokens_per_forward",
    "acceptance_length",
    "peak_memory_gb",
    "vs_mlx_lm",
    "identical_output",
    "outside_forward_share",
    "rounds",
}
REFERENCE_MAPS = """\
7f0000000000-7f0000001000 r-xp 00000000 08:01 42 /venv/lib/python3.11/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0
7f0000002000-7f0000003000 r-xp 00000000 08:01 43 /venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-ff651d7f.so
7f0000004000-7f0000005000 rw-p 00000000 00:00 0 [heap]
"""
OPENBLAS_LINE = (
    "7f0000006000-7f0000007000 r-xp 00000000 08:01 44 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0\n"
)


@pytest.fixture(autouse=True)
def no_reexec(monkeypatch):
    """Inside pytest the command must never re-exec itself: the guard says it already did."""
    monkeypatch.setenv(blas.REEXEC_GUARD, "1")


def benchmark(*args):
    return CliRunner().invoke(main, ["benchmark", *map(str, args)])


def json_lines(output: str):
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def error_lines(output: str):
    return [line for line in output.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize(
    "family, methods",
    [
        ("dflash", ["mlx_lm", "ar", "dflash"]),
        ("dflash2", ["mlx_lm", "ar", "dflash"]),  # its chains, by default
        ("nemotron", ["mlx_lm", "ar", "diffusion", "linear-spec", "quadratic-spec"]),
        ("diffusion-gemma", ["diffusion"]),
    ],
)
def test_benchmark_runs_each_tiny_family(family, methods):
    result = benchmark("--tiny", family, *QUICK)
    assert result.exit_code == 0, result.output
    assert "gen tok/s" in result.output and "BLAS:" in result.output
    [record] = json_lines(result.output)
    assert JSON_KEYS <= set(record)
    assert list(record["methods"]) == methods
    assert all(ROW_KEYS <= set(row) for row in record["methods"].values())
    assert record["outputs_match"] is True and record["mismatches"] == []
    lossless = [m for m in methods if m != runner.MLX_LM and m in {mode.name for mode in all_modes() if mode.lossless}]
    assert all(record["methods"][m]["identical_output"] is True for m in lossless)


def test_benchmark_block_size_reaches_every_dflash_run(monkeypatch):
    from mlx_dllm.sampler import dflash

    blocks, real = [], dflash._decode

    def spy(*args):
        blocks.append(args[7])  # _decode(target, draft, head, prompt, select, stats, max_tokens, block_size, ...)
        return real(*args)

    monkeypatch.setattr(dflash, "_decode", spy)
    result = benchmark("--tiny", "dflash", "--block-size", "3", *QUICK)
    assert result.exit_code == 0, result.output
    [record] = json_lines(result.output)
    assert record["block_size"] == 3 and record["outputs_match"] is True
    assert len(blocks) >= 3 and set(blocks) == {3}  # warm-up, measured and instrumented runs


def test_the_sweep_runs_every_chain_tree_and_auto_losslessly_and_plots_them_against_budget(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    result = benchmark("--tiny", "dflash", "--sweep", "--plot", plot, *QUICK)
    assert result.exit_code == 0, result.output
    [record] = json_lines(result.output)
    chains = [f"dflash:speculation=chain:block_size={b}" for b in range(2, 9)]
    trees = [f"dflash:speculation=tree:tree_budget={b}" for b in (4, 8, 16, 32)]
    assert list(record["methods"]) == ["mlx_lm", *chains, *trees, "dflash:speculation=auto"]
    assert record["outputs_match"] is True
    rows = record["methods"]
    assert rows[chains[0]]["rounds"]["chain"] == 1.0 and rows[trees[0]]["rounds"]["tree"] > 0
    assert rows["dflash:speculation=auto"]["rounds"] is not None and rows["mlx_lm"]["rounds"] is None
    assert plot.stat().st_size > 0 and "Plot:" in result.output


def test_benchmark_restores_the_forward_methods_it_times():
    import mlx.nn as nn

    from mlx_dllm.models.target import Target

    originals = (nn.Linear.__call__, Target.__call__, Target.embed)
    result = benchmark("--tiny", "dflash", *QUICK)
    assert result.exit_code == 0, result.output
    assert (nn.Linear.__call__, Target.__call__, Target.embed) == originals
    [record] = json_lines(result.output)
    assert all(0 <= row["outside_forward_share"] <= 1 for row in record["methods"].values())


def test_benchmark_reports_a_forced_mismatch(monkeypatch):
    real = runner.mode_runner

    def corrupted(mode, block_size=None, options=None):
        run = real(mode, block_size, options)
        if mode.name != "quadratic-spec":
            return run

        def wrong(*args):
            sample = run(*args)
            sample.tokens[-1] = (sample.tokens[-1] + 1) % 250 + 2
            return sample

        return wrong

    monkeypatch.setattr(runner, "mode_runner", corrupted)
    result = benchmark("--tiny", "nemotron", "--modes", "ar,quadratic-spec", *QUICK)
    assert result.exit_code == 0, result.output
    [record] = json_lines(result.output)
    assert record["outputs_match"] is False
    assert [(m["method"], m["reference"]) for m in record["mismatches"]] == [("quadratic-spec", "mlx_lm")]
    assert record["methods"]["quadratic-spec"]["identical_output"] is False
    assert record["methods"]["ar"]["identical_output"] is True
    assert "MISMATCH: quadratic-spec differs from mlx_lm" in result.output


def test_benchmark_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "bench.png"
    result = benchmark("--tiny", "dflash", *QUICK, "--plot", picture)
    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]


def test_benchmark_plot_without_matplotlib_is_one_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = benchmark("--tiny", "dflash", *QUICK, "--plot", tmp_path / "bench.png")
    assert result.exit_code != 0
    assert error_lines(result.output) == ["Error: --plot needs matplotlib: pip install 'mlx-dllm[bench]'"]


def test_benchmark_forward_cost_curve():
    result = benchmark("--tiny", "nemotron", "--forward-cost", "--repeats", "1")
    assert result.exit_code == 0, result.output
    [record] = json_lines(result.output)
    assert record["benchmark"] == "forward-cost" and record["cache_tokens"] == 256
    assert list(record["ratio_to_one_token"]) == ["1", "2", "4", "8", "16", "32", "64"]
    assert record["ratio_to_one_token"]["1"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --model (a checkpoint) or --tiny FAMILY"),
        (["--tiny", "dflash", "--repeats", "0"], "Invalid value for '--repeats'"),
        (["--tiny", "dflash", "--draft-model", "x"], "--tiny dflash builds its own drafter"),
        (
            ["--tiny", "dflash", "--modes", "quadratic-spec", *QUICK],
            "--modes: this model runs ar, dflash, not quadratic-spec",
        ),
        (["--tiny", "dflash", "--prompts", "no-such-set", *QUICK], "--prompts no-such-set: not a built-in set"),
        (["--tiny", "dflash", "--plot", "picture.jpg"], "--plot writes a PNG"),
        (["--tiny", "nemotron", "--forward-cost", "--modes", "ar"], "--forward-cost measures forwards alone"),
        (["--tiny", "nemotron", "--block-size", "4", *QUICK], "--block-size is DFlash's"),
        (["--tiny", "dflash", "--block-size", "1", *QUICK], "Invalid value for '--block-size'"),
        (["--tiny", "dflash", "--block-size", "9", *QUICK], "between 2 and the drafter's trained 8, got 9"),
        (["--tiny", "nemotron", "--sweep", *QUICK], "--sweep runs DFlash's chains and trees: it needs"),
        (["--tiny", "dflash", "--modes", "dflash:tree_budget=x", *QUICK],
         "--modes dflash:tree_budget=x: tree_budget must be an integer, got 'x'"),
        (["--tiny", "dflash", "--modes", "dflash:bush=1", *QUICK], "--modes dflash:bush=1: dflash has no option bush"),
        (["--tiny", "dflash", "--modes", "dflash:tree", *QUICK], "write a mode's options as NAME:OPTION=VALUE"),
        (["--tiny", "dflash", "--modes", "dflash:speculation=bush", *QUICK],
         "speculation must be one of auto, chain, tree, got 'bush'"),
    ],
)
def test_benchmark_bad_flags_are_one_error_line(args, message):
    result = benchmark(*args)
    assert result.exit_code != 0
    [line] = error_lines(result.output)
    assert message in line
    assert "Traceback" not in result.output


def test_shipped_prompt_sets_load():
    sizes = {name: len(read_prompts(name, 10_000)) for name in BUILT_IN}
    assert sizes == {"gsm8k": 200, "mt-bench": 80, "humaneval": 164}
    assert read_prompts("humaneval", 1)[0].startswith("from typing import List")
    assert "Janet" in read_prompts("gsm8k", 1)[0]


def test_detects_the_reference_blas_despite_numpys_openblas():
    assert blas.active_blas(blas.loaded_blas(REFERENCE_MAPS)) == "reference"
    assert blas.active_blas(blas.loaded_blas(REFERENCE_MAPS + OPENBLAS_LINE)) == "openblas"
    assert blas.active_blas(blas.loaded_blas("")) == "unknown"
    assert blas.reference_blas_warning("reference", "Device(cpu, 0)").startswith("warning: MLX runs the reference BLAS")
    assert blas.reference_blas_warning("openblas", "Device(cpu, 0)") is None
    assert blas.reference_blas_warning("reference", "Device(gpu, 0)") is None
    installed = blas.reference_blas_warning("reference", "Device(cpu, 0)", "/usr/lib/libopenblas.so.0")
    assert installed.endswith(": preload it with LD_PRELOAD=/usr/lib/libopenblas.so.0")  # e.g. a Python process


OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def test_preload_decision():
    environment = blas.preload_environment("auto", {"LD_PRELOAD": "/x.so"}, "linux", "reference", OPENBLAS)
    assert environment["LD_PRELOAD"] == f"{OPENBLAS} /x.so" and environment[blas.REEXEC_GUARD] == "1"
    assert blas.preload_environment("auto", {blas.REEXEC_GUARD: "1"}, "linux", "reference", OPENBLAS) is None
    assert blas.preload_environment("auto", {}, "darwin", "reference", OPENBLAS) is None
    assert blas.preload_environment("reference", {}, "linux", "reference", OPENBLAS) is None
    assert blas.preload_environment("auto", {}, "linux", "openblas", OPENBLAS) is None
    assert blas.preload_environment("auto", {}, "linux", "reference", None) is None


def test_ensure_blas_reexecs_with_openblas_preloaded(monkeypatch):
    monkeypatch.delenv(blas.REEXEC_GUARD)
    calls = []
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setattr(blas.sys, "argv", ["/venv/bin/mlx-dllm", "benchmark", "--tiny", "dflash"])
    monkeypatch.setattr(blas, "current_blas", lambda: "reference")
    monkeypatch.setattr(blas, "find_openblas", lambda: OPENBLAS)
    monkeypatch.setattr(blas.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    blas.ensure_blas("auto")
    [(path, argv, env)] = calls
    assert argv == [sys.executable, "-m", "mlx_dllm.cli", "benchmark", "--tiny", "dflash"]
    assert env["LD_PRELOAD"].startswith(OPENBLAS) and env[blas.REEXEC_GUARD] == "1"
    calls.clear()
    blas.ensure_blas("reference")
    assert calls == []


def test_blas_openblas_without_openblas_is_one_error(monkeypatch):
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setattr(blas, "current_blas", lambda: "reference")
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    result = benchmark("--tiny", "dflash", "--blas", "openblas", *QUICK)
    assert result.exit_code != 0
    [line] = error_lines(result.output)
    assert "--blas openblas: no OpenBLAS found" in line


def test_wheel_ships_the_prompt_sets(tmp_path):
    pytest.importorskip("setuptools")
    import shutil
    import subprocess
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    ignored = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "tests", "benchmarks"
    )
    shutil.copytree(repo, source, ignore=ignored)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist"]
    subprocess.run([*build, source], check=True)
    (wheel,) = (tmp_path / "dist").glob("mlx_dllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mlx_dllm/benchmark/prompts/{name}.jsonl" for name in BUILT_IN} <= names
    assert "mlx_dllm/cli/benchmark.py" in names and "mlx_dllm/benchmark/session.py" in names
