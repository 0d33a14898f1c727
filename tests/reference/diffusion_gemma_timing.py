"""DiffusionGemma: ours (MLX) vs the transformers reference (torch, CPU), in one process on the same tiny weights.

    python -m tests.reference.diffusion_gemma_timing                        # tiny random checkpoint (needs torch)
    python -m tests.reference.diffusion_gemma_timing --hidden 256 --vocab 4096 --canvas 64   # a bigger tiny config
    python -m tests.reference.diffusion_gemma_timing --model PATH           # a converted checkpoint: ours only

Both run the entropy-bound sampler with the same knobs and the same token-id prompts; their random streams
differ, so step counts differ run to run: the table gives medians, and mean forwards per canvas. EOS is ignored
by default, so every run produces exactly --max-tokens tokens. Prints a table and one final JSON line.
"""

import argparse
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx_lm

import mlx_dllm
from mlx_dllm.models.diffusion_gemma import Model as DiffusionGemma
from mlx_dllm.sampler import diffusion as diffusion_sampler
from mlx_dllm.sampler.common import Stats
from mlx_dllm.sampler.diffusion import DiffusionSettings
from mlx_dllm.benchmark.prompts import encode, read_prompts
from mlx_dllm.benchmark.report import fmt, median

KNOBS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")
OVERHEAD_TARGET = 0.05


def tiny_overrides(args) -> dict:
    """text_config overrides for the builder; a flag left unset keeps the builder's own value."""
    overrides = {}
    if args.hidden:
        head_dim = max(8, args.hidden // 4)
        overrides.update(
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 3 // 2,
            moe_intermediate_size=max(16, args.hidden // 2),
            head_dim=head_dim,
            global_head_dim=2 * head_dim,
        )
    if args.layers:
        kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)]
        kinds[-1] = "full_attention"
        overrides.update(num_hidden_layers=args.layers, layer_types=kinds)
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    if args.window:
        overrides["sliding_window"] = args.window
    return overrides


def build_tiny(root: Path, args):
    """A tiny random DiffusionGemma, built (and saved) by the transformers reference; returns the torch model."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.reference
    try:
        import torch
        from transformers.utils.logging import disable_progress_bar

        from tests.reference import diffusion_gemma as reference
    except ImportError as error:
        raise SystemExit(f"--tiny needs torch and transformers ({error})")
    disable_progress_bar()
    saved_canvas = reference.CANVAS
    if args.canvas:
        reference.CANVAS = args.canvas  # the builder reads its canvas length from this module constant
    try:
        model = reference.build_model(root, **tiny_overrides(args))
    finally:
        reference.CANVAS = saved_canvas
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    return model


# ---------------------------------------------------------------------------------------------- memory


def _status_kb(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@contextmanager
def peak_rss(result: dict):
    """Process peak-RSS growth (GB) over the block: Linux VmHWM, reset through /proc/self/clear_refs, after
    returning freed memory to the OS (MLX buffer cache, glibc heap). None where that is not available."""
    gc.collect()
    mx.clear_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        ok = before is not None
    except OSError:
        ok = False
    yield
    peak = _status_kb("VmHWM") if ok else None
    result["rss_peak_gb"] = None if peak is None else max(0, peak - before) / 1e6


# ---------------------------------------------------------------------------------------------- ours


def run_ours(model, tokenizer, prompt, args, seed) -> dict:
    """One generation through the public API; numbers as `stream_generate` reports them."""
    start = time.perf_counter()
    responses = list(mlx_dllm.stream_generate(model, tokenizer, prompt, args.max_tokens, seed=seed, **args.knobs))
    wall = time.perf_counter() - start
    last = responses[-1]
    gen_s = last.generation_tokens / last.generation_tps
    return {
        "tokens": last.generation_tokens,
        "forwards": last.forwards,
        "canvases": last.canvases,
        "wall_s": wall,
        "gen_s": gen_s,
        "prefill_s": last.prompt_tokens / last.prompt_tps,
        "mlx_peak_gb": last.peak_memory,
    }


# ---------------------------------------------------------------------------------------------- reference


class TorchClock:
    """Wall clocks around the reference's decoder forward, encoder and `_denoising_step` (torch on CPU runs
    synchronously, so no syncs are needed and the clocks cost ~1 us per call)."""

    def __init__(self):
        self.calls = []

    def wrap(self, kind, call):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = call(*args, **kwargs)
            end = time.perf_counter()
            self.calls.append((kind, end - start, end))
            return out

        return timed


@contextmanager
def instrumented_reference(model, clock: TorchClock):
    encoder = model.model.encoder
    # Instance attributes shadow the methods: generate() binds `self.forward` and calls `self.model.encoder(...)`
    # and `self._denoising_step(...)`.
    model.forward = clock.wrap("denoise", model.forward)
    encoder.forward = clock.wrap("encode", encoder.forward)
    model._denoising_step = clock.wrap("step", model._denoising_step)
    try:
        yield
    finally:
        del model.forward, encoder.forward, model._denoising_step


def run_reference(model, prompt, args, seed) -> dict:
    """transformers' own `generate` (dynamic cache, no draw recorder), instrumented as TorchClock says."""
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    knobs = dict(args.knobs)
    # As a plain keyword transformers would silently ignore it; it belongs in sampler_config.
    knobs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(knobs.pop("entropy_bound")))
    if args.eos:
        knobs["eos_token_id"] = sorted(args.eos_ids)
    clock = TorchClock()
    torch.manual_seed(seed)
    with torch.no_grad(), instrumented_reference(model, clock):
        start = time.perf_counter()
        out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens, **knobs)
        end = time.perf_counter()
    new = out.sequences[0, len(prompt) :]
    if args.eos and model.generation_config.pad_token_id is not None:
        new = new[new != model.generation_config.pad_token_id]
    encodes = [c for c in clock.calls if c[0] == "encode"]
    prefill_done = encodes[0][2]
    forwards = sum(1 for c in clock.calls if c[0] == "denoise")
    denoise_s = sum(c[1] for c in clock.calls if c[0] == "denoise")
    step_s = sum(c[1] for c in clock.calls if c[0] == "step")
    gen_s = end - prefill_done
    return {
        "tokens": int(new.numel()),
        "forwards": forwards,
        "canvases": len(encodes),  # one encoder call per canvas: the prompt, then each commit but the last
        "wall_s": end - start,
        "gen_s": gen_s,
        "prefill_s": encodes[0][1],
        "step_overhead": 1 - denoise_s / step_s,
        "gen_overhead": 1 - (denoise_s + sum(c[1] for c in encodes[1:])) / gen_s,
        "forward_ms": 1e3 * denoise_s / forwards,
        "step_ms": 1e3 * step_s / forwards,
    }


# ---------------------------------------------------------------------------------------------- passes


def overhead_ours(model, prompt, trials: int = 15, steps: int = 12) -> dict:
    """Share of each denoising step outside the model forward. The real loop (`denoise_canvas`, sampler fused
    into the forward's graph, one sync per step, adaptive stop off) and the same number of forwards evaluated
    alone are timed in alternation, so that drift on a shared machine hits both; medians per step."""
    cache = model.make_cache()
    model.encode(mx.array([prompt]), cache)
    shape = (1, model.canvas_length, model.text.vocab_size)
    canvas = mx.random.randint(0, shape[2], shape[:2])
    self_conditioning = mx.random.normal(shape).astype(model.embedding_dtype)
    mx.eval([c.keys_and_values() for c in cache], canvas, self_conditioning)
    settings = DiffusionSettings(max_denoising_steps=steps, confidence_threshold=None)

    def loop():
        diffusion_sampler.denoise_canvas(model, cache, settings, diffusion_sampler.RandomNoise(), Stats())

    def forwards():
        for _ in range(steps):
            mx.eval(model.denoise(canvas, cache, self_conditioning))

    loop_ms, forward_ms = [], []
    for trial in range(trials + 2):  # the first two warm up
        for call, times in ((loop, loop_ms), (forwards, forward_ms)):
            start = time.perf_counter()
            call()
            if trial >= 2:
                times.append(1e3 * (time.perf_counter() - start) / steps)
    step, forward = statistics.median(loop_ms), statistics.median(forward_ms)
    return {"step_overhead": 1 - forward / step, "gen_overhead": None, "forward_ms": forward, "step_ms": step}


def matmul_gflops(size: int = 512) -> dict:
    """fp32 [size]^3 matmul throughput of each framework here: the CPU BLAS each one links differs, and it sets
    how much a bigger tiny config measures the BLAS rather than our code."""
    result = {}
    a = mx.random.normal((size, size))
    mx.eval(a)
    result["mlx"] = _gflops(size, lambda: mx.eval(a @ a))
    try:
        import torch
    except ImportError:
        return result
    b = torch.randn(size, size)
    result["torch"] = _gflops(size, lambda: b @ b)
    return result


def _gflops(size, call, repeats=5):
    call()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(samples: list, extra: list) -> dict:
    """Medians per run; forwards per canvas as the mean over all canvases of all runs."""
    for s in samples:
        s["tps"] = s["tokens"] / s["gen_s"]
        s["e2e_tps"] = s["tokens"] / s["wall_s"]
        s["ms_per_step"] = 1e3 * s["gen_s"] / s["forwards"]
    row = {k: median(s.get(k) for s in samples) for k in ("tps", "e2e_tps", "ms_per_step", "mlx_peak_gb")}
    row["forwards_per_canvas_mean"] = sum(s["forwards"] for s in samples) / sum(s["canvases"] for s in samples)
    row["forwards_per_canvas_median"] = median(s["forwards"] / s["canvases"] for s in samples)
    row["tokens_per_forward"] = median(s["tokens"] / s["forwards"] for s in samples)
    row["tokens_median"] = median(s["tokens"] for s in samples)
    for key in ("step_overhead", "gen_overhead", "forward_ms", "step_ms", "rss_peak_gb"):
        row[key] = median(e.get(key) for e in extra)
    row["runs"] = len(samples)
    return row


def print_report(table: dict, ratios: dict, args, torch_threads, blas: dict) -> None:
    print(
        f"\n{'method':<10} {'gen tok/s':>10} {'e2e tok/s':>10} {'ms/step':>8} {'fwd/canvas':>10} "
        f"{'tok/fwd':>8} {'step ovh':>9} {'gen ovh':>8} {'MLX peak GB':>11} {'RSS peak GB':>11}"
    )
    for method, r in table.items():
        print(
            f"{method:<10} {r['tps']:>10.1f} {r['e2e_tps']:>10.1f} {r['ms_per_step']:>8.2f} "
            f"{r['forwards_per_canvas_mean']:>10.2f} {r['tokens_per_forward']:>8.2f} "
            f"{fmt(r['step_overhead'], '.1%'):>9} {fmt(r['gen_overhead'], '.1%'):>8} "
            f"{fmt(r['mlx_peak_gb'], '.4f'):>11} {fmt(r['rss_peak_gb'], '.4f'):>11}"
        )
    if ratios:
        print(
            f"\nours / reference: gen tok/s {ratios['tps']:.2f}x, e2e tok/s {ratios['e2e_tps']:.2f}x, "
            f"time per denoising step {ratios['ms_per_step']:.2f}x (lower is better), "
            f"forwards per canvas {ratios['forwards_per_canvas']:.2f}x"
        )
    ours = table["ours"]
    verdict = "meets" if ours["step_overhead"] <= OVERHEAD_TARGET else "MISSES"
    print(
        f"sampler overhead (ours): {ours['step_overhead']:.1%} of each denoising step is outside the model "
        f"forward -> {verdict} the <= {OVERHEAD_TARGET:.0%} target "
        f"(forward {ours['forward_ms']:.2f} ms, step {ours['step_ms']:.2f} ms)"
    )
    print(
        f"\nMedians over {args.repeats} repeat(s) x {args.num_prompts} prompt(s); MLX on {mx.default_device()}"
        + (f", torch on CPU with {torch_threads} thread(s)" if torch_threads else "")
        + ". fwd/canvas: mean over all canvases.\n"
        "gen tok/s = generated tokens / time after the prompt's encoder pass (commit encodes included); e2e "
        "includes it;\n  ms/step = that generation time / denoiser forwards (independent of how many steps the "
        "random streams took).\n"
        "step ovh = 1 - (model forward time) / (denoising-loop time): the sampler's share of a step. gen ovh = "
        "1 - (denoiser +\n  commit-encoder time) / generation time. Ours: from a separate run that evaluates "
        "every model call synchronously\n  (the headline runs evaluate forward and sampler in one graph, so this is "
        "an upper bound); the reference: from the headline runs\n  (torch on CPU is synchronous).\n"
        "MLX peak = mx.get_peak_memory over a headline run; RSS peak = growth of the process's peak RSS (Linux "
        "VmHWM) over one\n  extra run per method on prompt 0, after freeing caches and trimming the heap (weights "
        "already resident, so excluded)."
    )
    print(
        "fp32 512^3 matmul here: "
        + ", ".join(f"{name} {gflops:.1f} GFLOP/s" for name, gflops in blas.items())
        + " (bigger configs are matmul-bound: there the ratio compares CPU BLAS libraries more than our code)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a converted DiffusionGemma (path or hub id): ours only, no reference")
    source.add_argument("--tiny", action="store_true", help="tiny random checkpoint + reference (the default)")
    size = parser.add_argument_group("tiny config (default: the test builder's own: hidden 32, 4 layers, vocab 256)")
    size.add_argument("--hidden", type=int, help="hidden size (head dims and MLP widths follow)")
    size.add_argument("--layers", type=int, help="decoder layers, alternating sliding/full, the last full")
    size.add_argument("--vocab", type=int, help="vocabulary size (the tokenizer only names ids < 256)")
    size.add_argument("--canvas", type=int, help="canvas length (builder default 8)")
    size.add_argument("--window", type=int, help="sliding window (builder default 8)")
    parser.add_argument(
        "--prompts", default="gsm8k", help="built-in set (gsm8k, mt-bench, humaneval) or a jsonl/text file"
    )
    parser.add_argument("--num-prompts", type=int, default=5)
    parser.add_argument("--max-tokens", "-m", type=int, default=128, help="rounded up to whole canvases")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, help="default: torch's own (one per core)")
    parser.add_argument("--eos", action=argparse.BooleanOptionalAction, default=False, help="stop at EOS")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the tokenizer's chat template (default: when it has one; --model only)",
    )
    knobs = parser.add_argument_group("denoising knobs (the same for both; defaults stop early on the tiny model)")
    knobs.add_argument("--max-denoising-steps", type=int, default=12)
    knobs.add_argument("--entropy-bound", type=float, default=0.5)
    knobs.add_argument("--t-min", type=float, default=0.4)
    knobs.add_argument("--t-max", type=float, default=0.8)
    knobs.add_argument("--stability-threshold", type=int, default=0)
    knobs.add_argument("--confidence-threshold", type=float, default=1.3)
    args = parser.parse_args()
    args.tiny = args.model is None
    if not args.tiny and any((args.hidden, args.layers, args.vocab, args.canvas, args.window)):
        parser.error("the tiny-config flags need --tiny")
    args.knobs = {k: getattr(args, k) for k in KNOBS}

    reference_model = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            reference_model = build_tiny(Path(tmp), args)
            path = tmp
        else:
            path = args.model
        model, tokenizer = mlx_dllm.load(path)
    if not isinstance(model, DiffusionGemma):
        raise SystemExit(f"{path} is not a DiffusionGemma checkpoint")
    args.eos_ids = set(tokenizer.eos_token_ids)
    if not args.eos:
        tokenizer.eos_token_ids = set()  # every run then produces exactly max_tokens tokens
    canvas = model.canvas_length
    args.max_tokens = canvas * math.ceil(args.max_tokens / canvas)  # the reference always returns whole canvases
    vocab = model.text.vocab_size if args.tiny else 0
    chat = bool(tokenizer.has_chat_template if args.chat_template is None else args.chat_template) and not args.tiny
    texts = read_prompts(args.prompts, args.num_prompts)
    prompts = [encode(tokenizer, p, vocab) if chat or vocab else tokenizer.encode(p) for p in texts]
    args.num_prompts = len(prompts)
    torch_threads = None
    methods = ["ours"]
    if reference_model is not None:
        import torch

        torch_threads = torch.get_num_threads()
        methods.append("reference")
    else:
        print("--model: the transformers reference is skipped (it would need the full torch checkpoint)")

    def run(method, prompt, seed):
        if method == "ours":
            return run_ours(model, tokenizer, prompt, args, seed)
        return run_reference(reference_model, prompt, args, seed)

    started = time.perf_counter()
    for _ in range(args.warmup):
        for method in methods:
            run(method, prompts[0], args.seed)
    samples = {m: [] for m in methods}
    for repeat in range(args.repeats):
        for index, prompt in enumerate(prompts):
            seed = args.seed + 1000 * repeat + index
            for method in methods:  # interleaved, so drifts in machine load hit both alike
                samples[method].append(run(method, prompt, seed))
    extra = {m: [] for m in methods}
    extra["ours"] = [overhead_ours(model, prompt) for prompt in prompts]
    if "reference" in methods:
        extra["reference"] = [dict(s) for s in samples["reference"]]
    for method in methods:  # one memory run each
        memory = {}
        with peak_rss(memory):
            run(method, prompts[0], args.seed)
        extra[method][0]["rss_peak_gb"] = memory["rss_peak_gb"]
    elapsed = time.perf_counter() - started

    table = {m: summarize(samples[m], extra[m]) for m in methods}
    ratios = {}
    if "reference" in table:
        ours, ref = table["ours"], table["reference"]
        ratios = {
            "tps": ours["tps"] / ref["tps"],
            "e2e_tps": ours["e2e_tps"] / ref["e2e_tps"],
            "ms_per_step": ours["ms_per_step"] / ref["ms_per_step"],
            "forwards_per_canvas": ours["forwards_per_canvas_mean"] / ref["forwards_per_canvas_mean"],
        }
    blas = matmul_gflops()
    print_report(table, ratios, args, torch_threads, blas)
    config = model.text
    versions = {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "mlx_dllm": mlx_dllm.__version__}
    if reference_model is not None:
        import torch
        import transformers

        versions.update(torch=torch.__version__, transformers=transformers.__version__)
    print(
        json.dumps(
            {
                "benchmark": "diffusion_gemma",
                "methods": table,
                "ours/reference": ratios or None,
                "overhead_target": OVERHEAD_TARGET,
                "meets_overhead_target": table["ours"]["step_overhead"] <= OVERHEAD_TARGET,
                **versions,
                "device": str(mx.default_device()),
                "torch_threads": torch_threads,
                "matmul_gflops_fp32_512": blas,
                "platform": platform.platform(),
                "model": "tiny" if args.tiny else args.model,
                "config": {
                    "hidden_size": config.hidden_size,
                    "num_hidden_layers": config.num_hidden_layers,
                    "vocab_size": config.vocab_size,
                    "canvas_length": canvas,
                    "sliding_window": config.sliding_window,
                    "num_experts": config.num_experts,
                    "top_k_experts": config.top_k_experts,
                },
                "knobs": args.knobs,
                "max_tokens": args.max_tokens,
                "eos": args.eos,
                "num_prompts": len(prompts),
                "repeats": args.repeats,
                "warmup": args.warmup,
                "seed": args.seed,
                "prompt_tokens_median": median(len(p) for p in prompts),
                "measure_s": elapsed,
            }
        )
    )


if __name__ == "__main__":
    try:
        main()
    except mlx_dllm.DLLMError as error:
        raise SystemExit(f"error: {error}")
