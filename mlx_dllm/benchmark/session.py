"""One `mlx-dllm benchmark` run: load (or build a tiny model), choose the methods, measure, report."""

import platform
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from .. import blas
from ..errors import DLLMError
from ..output import echo
from ..sampler.mode import modes_of
from . import forward_cost, overhead, prompts, report, roofline, runner, tiny


@dataclass
class Options:
    model: Optional[str]
    draft_model: Optional[str]
    tiny: Optional[str]
    modes: Optional[List[str]]
    prompts: str
    num_prompts: int
    max_tokens: int
    repeats: int
    plot: Optional[Path]
    project: Optional[str]
    forward_cost: bool
    kernels: bool = False
    block_size: Optional[int] = None  # DFlash's block (None: the drafter's trained one)
    sweep: bool = False  # DFlash's chains, trees and auto, method by method


def check_options(options: Options) -> None:
    tiny_drafter = options.tiny is not None and tiny.tiny_family(options.tiny).tiny.target is not None
    if options.block_size is not None and options.draft_model is None and not tiny_drafter:
        raise DLLMError("--block-size is DFlash's: it needs --draft-model or --tiny dflash")
    if options.kernels:
        if options.model or options.tiny or options.draft_model or options.modes or options.forward_cost:
            raise DLLMError("--kernels times the attention kernels alone: it takes no model, modes or --forward-cost")
        return
    if (options.model is None) == (options.tiny is None):
        raise DLLMError("give --model (a checkpoint) or --tiny FAMILY (a tiny random one), exactly one")
    if options.tiny is not None and options.draft_model is not None:
        raise DLLMError("--tiny dflash builds its own drafter: --draft-model goes with --model")
    if options.forward_cost and any((options.modes, options.plot, options.project, options.block_size, options.sweep)):
        raise DLLMError(
            "--forward-cost measures forwards alone: no --modes, --plot, --project, --block-size or --sweep"
        )
    if options.sweep and options.draft_model is None and not tiny_drafter:
        raise DLLMError("--sweep runs DFlash's chains and trees: it needs --draft-model or --tiny dflash")
    if options.plot is not None:
        from .plot import check_plot_path

        check_plot_path(options.plot)


@contextmanager
def loaded_models(options: Options) -> Iterator[Tuple[object, object, object]]:
    """(model, tokenizer, draft or None), from the checkpoints or a tiny random one built in a temporary folder."""
    from ..loading import load_pair

    with tempfile.TemporaryDirectory(prefix="mlx-dllm-tiny-") as folder:
        if options.tiny is None:
            loaded = load_pair(options.model, options.draft_model)
        else:
            model_path, draft_path = tiny.build_tiny(options.tiny, Path(folder))
            loaded = load_pair(str(model_path), None if draft_path is None else str(draft_path))
    yield loaded


def supported_modes(model, draft) -> List[str]:
    return [name for name, mode in modes_of(model).items() if not mode.drafter or draft is not None]


def choose_methods(model, draft, asked: Optional[List[str]], sweep: bool = False) -> List[str]:
    """The mlx-lm baseline (wherever plain AR runs) followed by the asked methods (else every supported mode, or
    with `sweep` none), then the sweep's."""
    supported = supported_modes(model, draft)
    for method in asked or ():
        name = runner.split_method(method)[0]
        if name not in supported:
            raise DLLMError(f"--modes: this model runs {', '.join(supported)}, not {name}")
    methods = list(dict.fromkeys((asked or ([] if sweep else supported)) + (sweep_methods(draft) if sweep else [])))
    baseline = [runner.MLX_LM] if "ar" in modes_of(model) else []
    return baseline + methods


SWEEP_BUDGETS = (4, 8, 16, 32)


def sweep_methods(draft) -> List[str]:
    """DFlash's chains at every block from 2 to the drafter's, trees at SWEEP_BUDGETS nodes, and auto."""
    chains = [f"dflash:speculation=chain:block_size={block}" for block in range(2, draft.block_size + 1)]
    trees = [f"dflash:speculation=tree:tree_budget={budget}" for budget in SWEEP_BUDGETS]
    return chains + trees + ["dflash:speculation=auto"]


def environment(device: str) -> dict:
    import mlx.core as mx
    import mlx_lm

    from .. import __version__

    return {
        "blas": blas.current_blas(),
        "device": device,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlx_dllm": __version__,
        "platform": platform.platform(),
    }


def announce(env: dict) -> None:
    echo(f"BLAS: {env['blas']}, device {env['device']}, mlx {env['mlx']}, mlx-lm {env['mlx_lm']}")
    blas.warn_reference_blas()


def model_label(options: Options) -> str:
    return f"tiny-{options.tiny}" if options.tiny else options.model


def run(options: Options) -> None:
    import mlx.core as mx

    check_options(options)
    env = environment(str(mx.default_device()))
    announce(env)
    if options.kernels:
        from .kernels import run_kernel_benchmark

        return echo(report.json_line(run_kernel_benchmark(env)))
    with loaded_models(options) as (model, tokenizer, draft):
        if options.forward_cost:
            return run_forward_cost(options, model, env)
        methods = choose_methods(model, draft, options.modes, options.sweep)
        texts = prompts.read_prompts(options.prompts, options.num_prompts)
        vocab = tiny.VOCAB if options.tiny else 0
        ids = [prompts.encode(tokenizer, text, vocab) for text in texts]
        run_method = runner.runners(model, methods, options.block_size)
        exact = runner.lossless(model, methods)
        samples, mismatches = measure(model, tokenizer, draft, ids, run_method, options)
        shares = outside_shares(model, tokenizer, draft, ids[0], run_method, options.max_tokens)
    table = report.summarize(samples, mismatches, shares, exact)
    echo("\n" + "\n".join(report.table_lines(table)))
    echo(
        f"Medians over {options.repeats} repeat(s) x {len(ids)} prompt(s) of '{options.prompts}', greedy, "
        f"{options.max_tokens} tokens at most; vs mlx_lm = median of paired tokens/s ratios."
    )
    echo(
        "outside = share of wall time outside model forwards (selection, acceptance, rollback, detokenizing,\n"
        "  Python), from a separate run that evaluates every forward on the spot: an upper bound on its cost."
    )
    for line in report.mismatch_lines(mismatches):
        echo(line)
    record = {
        "benchmark": "generation",
        "model": model_label(options),
        "draft_model": "tiny" if options.tiny and draft is not None else options.draft_model,
        "prompts": options.prompts,
        "num_prompts": len(ids),
        "prompt_tokens_median": report.median(len(p) for p in ids),
        "max_tokens": options.max_tokens,
        "repeats": options.repeats,
        "methods": table,
        "outputs_match": not mismatches,
        "mismatches": mismatches,
        **env,
    }
    if draft is not None:
        record["block_size"] = roofline.block_tokens(model, draft, options.block_size)
    if options.project:
        record["projection"] = projection(options.project, model, draft, table, options.block_size)
    if options.plot is not None:
        from .plot import write_plot

        title = f"{model_label(options)} - {env['device']}, BLAS {env['blas']}"
        write_plot(options.plot, table, samples, title, roofline.block_tokens(model, draft, options.block_size))
        echo(f"Plot: {options.plot}")
    echo(report.json_line(record))


def measure(model, tokenizer, draft, ids, run_method, options: Options):
    from tqdm import tqdm

    with tqdm(total=options.repeats * len(ids), desc="prompts", unit="prompt", leave=False) as bar:
        return runner.run_all(
            model, tokenizer, draft, ids, run_method, options.max_tokens, options.repeats, progress=bar.update
        )


def outside_shares(model, tokenizer, draft, prompt, run_method, max_tokens: int) -> dict:
    """Per method, the share of wall time outside forwards, from one instrumented run on the first prompt."""
    return {
        m: overhead.outside_share(lambda: run(model, tokenizer, prompt, max_tokens, draft), model, draft)
        for m, run in run_method.items()
    }


def projection(chips: str, model, draft, table: dict, block_size: Optional[int]) -> dict:
    """Print and return the roofline projection (speedup over AR per mode) for one chip or all."""
    tokens = {m: row["tokens_per_forward"] for m, row in table.items() if m != runner.MLX_LM}
    names = list(roofline.CHIPS) if chips == "all" else [chips]
    result = {chip: roofline.project(chip, model, draft, tokens, block_size) for chip in names}
    echo("PROJECTION (roofline, not a measurement): speedup over AR from the measured tokens per step,")
    echo("  t_forward = max(weight bytes / bandwidth, 2 x params x tokens / peak FLOPs)")
    for chip, speedups in result.items():
        bandwidth, flops = roofline.CHIPS[chip]
        cells = ", ".join(f"{mode} {value:.2f}x" for mode, value in speedups.items())
        echo(f"  {chip} (assumed {bandwidth / 1e9:.0f} GB/s, {flops / 1e12:.0f} TFLOPs): {cells}")
    return result


def run_forward_cost(options: Options, model, env: dict) -> None:
    from ..sampler.front import embedding_rows

    milliseconds = forward_cost.forward_cost(model, embedding_rows(model), max(options.repeats, 5))
    echo(f"\nForward cost over a {forward_cost.CACHE_TOKENS}-token cache (median ms, each forward alone):")
    echo("\n".join(forward_cost.cost_lines(milliseconds)))
    record = {
        "benchmark": "forward-cost",
        "model": model_label(options),
        "cache_tokens": forward_cost.CACHE_TOKENS,
        "milliseconds": milliseconds,
        "ratio_to_one_token": {n: ms / milliseconds[1] for n, ms in milliseconds.items()},
        **env,
    }
    echo(report.json_line(record))
