"""DFlash vs our AR baseline vs mlx-lm plain generation, in one process on the same target weights.

    python benchmarks/dflash.py                              # demo: tiny random target + drafter (torch)
    python benchmarks/dflash.py --model T --draft-model D    # checkpoints (folders or hub ids)

All runs are greedy. Prints a table of medians (over repeats and prompts), a roofline projection for
Apple GPUs, and one final JSON line. Random tiny weights accept ~1 token per round, so there DFlash is
expected to lose; the tiny run checks the plumbing and the overhead, not the speedup.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.utils import get_total_parameters

import mlx_dllm
from mlx_dllm.models.dflash import Model as DFlashDraft
from mlx_dllm.models.target import Target
from common import CHIPS, DATA, encode, fmt, median, read_prompts  # benchmarks/common.py, beside this script

METHODS = ("mlx_lm", "ours_ar", "dflash")


def build_tiny(root: Path, block_size: int):
    """A tiny random Qwen3 target and DFlash drafter, built by the transformers reference classes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness lives in tests/
    try:
        from transformers.utils.logging import disable_progress_bar

        from tests.reference import harness
    except ImportError as error:
        raise SystemExit(f"--tiny needs torch and transformers ({error})")
    disable_progress_bar()
    target = harness.build_target("qwen3_gqa", root / "target")
    harness.build_draft(target.config, root / "draft", block_size=block_size)
    return str(root / "target"), str(root / "draft"), harness.VOCAB


def run_once(method: str, target, tokenizer, draft, prompt: list, args) -> dict:
    """One greedy generation; numbers as each API reports them, peak memory reset around it."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    if method == "mlx_lm":
        responses = list(mlx_lm_stream_generate(target, tokenizer, prompt, args.max_tokens))
        tokens = [r.token for r in responses]
        if responses[-1].finish_reason == "stop":
            tokens.pop()  # mlx-lm reports the EOS token; ours does not
    else:
        options = {"draft_model": draft, "block_size": args.block_size} if method == "dflash" else {}
        responses = list(mlx_dllm.stream_generate(target, tokenizer, prompt, args.max_tokens, **options))
        tokens = [t for r in responses for t in r.tokens]
    wall = time.perf_counter() - start
    last = responses[-1]
    return {
        "generation_tps": last.generation_tps,
        "prompt_tps": last.prompt_tps,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "tokens_per_forward": getattr(last, "tokens_per_forward", 1.0),
        "acceptance_length": getattr(last, "acceptance_length", None),
        "generation_tokens": last.generation_tokens,
        "wall_s": wall,
        "tokens": tokens,
    }


class ForwardTimer:
    """Times model calls, each evaluated synchronously; nested calls count once."""

    def __init__(self):
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, call):
        def timed(*args, **kwargs):
            if self.depth:
                return call(*args, **kwargs)
            mx.eval([a for a in args if isinstance(a, mx.array)])  # pending sampler work stays outside
            self.depth += 1
            start = time.perf_counter()
            try:
                out = call(*args, **kwargs)
                mx.eval(out)
            finally:
                self.depth -= 1
            self.seconds += time.perf_counter() - start
            return out

        return timed


@contextmanager
def timed_forwards(timer: ForwardTimer, owners):
    """Patch `(class, method)` pairs with the timer, restoring them afterwards."""
    saved = [(cls, name, cls.__dict__.get(name)) for cls, name in owners]
    for cls, name in owners:
        setattr(cls, name, timer.wrap(getattr(cls, name)))
    try:
        yield
    finally:
        for cls, name, original in saved:
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


def overhead_share(method, target, tokenizer, draft, prompt, args) -> float:
    """Share of wall time outside model forwards, in a separate, serialised (instrumented) run."""
    timer = ForwardTimer()
    # The drafter's embed and lm_head are the target's, reached through the Target adapter.
    owners = [(type(target), "__call__"), (DFlashDraft, "__call__"), (Target, "embed"), (Target, "lm_head")]
    with timed_forwards(timer, owners):
        wall = run_once(method, target, tokenizer, draft, prompt, args)["wall_s"]
    return max(0.0, 1.0 - timer.seconds / wall)


def weights(*modules):
    """(bytes, parameter count) of the given modules' weights; quantized weights count unpacked."""
    nbytes = sum(v.nbytes for m in modules for _, v in tree_flatten(m.parameters()))
    return nbytes, sum(get_total_parameters(m) for m in modules)


def lm_head_module(target):
    head = getattr(target, "lm_head", None)
    return head if head is not None else Target(target).embed_tokens  # tied: the embedding table


def forward_seconds(nbytes, params, tokens, chip) -> float:
    bandwidth, flops = CHIPS[chip]
    return max(nbytes / bandwidth, 2 * params * tokens / flops)


def projection(target, draft, block_size: int, acceptance: float) -> dict:
    """Roofline: AR forward (1 token) vs verify (B tokens) + drafter with the target's lm_head (B tokens)."""
    target_w = weights(target)
    draft_w = weights(draft, lm_head_module(target))
    result = {}
    for chip in CHIPS:
        ar = forward_seconds(*target_w, 1, chip)
        round_time = forward_seconds(*target_w, block_size, chip) + forward_seconds(*draft_w, block_size, chip)
        result[chip] = {
            "speedup": acceptance * ar / round_time,
            "break_even_acceptance": round_time / ar,
        }
    return {
        "target_bytes": target_w[0],
        "target_params": target_w[1],
        "draft_bytes": draft_w[0],
        "draft_params": draft_w[1],
        "chips": result,
    }


def first_divergence(tokens, reference):
    """Index of the first token that differs from mlx-lm's greedy output (lossless decoding: never)."""
    if tokens == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def summarize(samples: dict, overheads: dict) -> dict:
    keys = ("generation_tps", "prompt_tps", "peak_memory_gb", "tokens_per_forward", "acceptance_length")
    table = {m: {k: median(s[k] for s in samples[m]) for k in keys} for m in METHODS}
    for m in METHODS:
        table[m]["overhead_share"] = median(overheads[m])
    mlx_lm_tps, ar_tps = table["mlx_lm"]["generation_tps"], table["ours_ar"]["generation_tps"]
    for m in METHODS:
        table[m]["vs_mlx_lm"] = table[m]["generation_tps"] / mlx_lm_tps
        table[m]["vs_ours_ar"] = table[m]["generation_tps"] / ar_tps
    return table


def print_report(table: dict, proj: dict, block_size: int, divergences: list) -> None:
    print(
        f"\n{'method':<8} {'gen tok/s':>10} {'prompt tok/s':>12} {'tok/fwd':>8} {'accept':>7} "
        f"{'peak GB':>8} {'overhead':>9} {'/mlx_lm':>8} {'/ours_ar':>8}"
    )
    for m in METHODS:
        r = table[m]
        print(
            f"{m:<8} {r['generation_tps']:>10.1f} {r['prompt_tps']:>12.1f} {r['tokens_per_forward']:>8.2f} "
            f"{fmt(r['acceptance_length'], '.2f'):>7} {r['peak_memory_gb']:>8.3f} "
            f"{r['overhead_share']:>9.1%} {r['vs_mlx_lm']:>8.2f} {r['vs_ours_ar']:>8.2f}"
        )
    print(
        f"\nMedians over repeats and prompts, measured on {mx.default_device()}. "
        f"Greedy outputs identical across methods: {not divergences}."
    )
    for d in divergences:
        print(
            f"  WARNING: {d['method']} differs from mlx_lm at token {d['position']} "
            f"(prompt {d['prompt']}, repeat {d['repeat']})"
        )
    print(
        "overhead = share of wall time outside model forwards (sampling, acceptance, cache rollback, "
        "detokenizing, Python),\n  from a separate run that evaluates every forward synchronously (a forward "
        "includes building its graph);\n  the headline runs overlap some of it with compute (async_eval), so "
        "it is an upper bound on its cost there."
    )
    acceptance = table["dflash"]["acceptance_length"] or 1.0
    print(
        f"\nPROJECTION (not a measurement): Apple-GPU DFlash speedup over AR, block size {block_size}, "
        f"measured acceptance {acceptance:.2f},\nroofline t_forward = max(weight bytes / bandwidth, "
        "2 * params * tokens / peak FLOPs); ignores attention, KV reads and launch costs."
    )
    print(
        f"  target {proj['target_params'] / 1e6:.2f}M params / {proj['target_bytes'] / 1e6:.1f} MB, "
        f"drafter+lm_head {proj['draft_params'] / 1e6:.2f}M / {proj['draft_bytes'] / 1e6:.1f} MB"
    )
    for chip, r in proj["chips"].items():
        bandwidth, flops = CHIPS[chip]
        print(
            f"  {chip:<9} (assumed {bandwidth / 1e9:.0f} GB/s, {flops / 1e12:.0f} TFLOPs fp16): "
            f"projected {r['speedup']:.2f}x, break-even acceptance {r['break_even_acceptance']:.2f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="target model: path or hub id")
    source.add_argument("--tiny", action="store_true", help="tiny random target + drafter (the default)")
    parser.add_argument("--draft-model", help="DFlash drafter: path or hub id")
    parser.add_argument("--prompts", type=Path, default=DATA / "gsm8k_test.jsonl", help="jsonl or text file")
    parser.add_argument("--num-prompts", type=int, default=5)
    parser.add_argument("--max-tokens", "-m", type=int, default=128)
    parser.add_argument("--block-size", type=int, help="default: the drafter's trained block size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the tokenizer's chat template (default: when it has one)",
    )
    args = parser.parse_args()
    if args.model and not args.draft_model:
        parser.error("--model needs --draft-model")
    args.tiny = args.model is None

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = 0
        if args.tiny:
            target_path, draft_path, vocab_size = build_tiny(Path(tmp), args.block_size or 16)
        else:
            target_path, draft_path = args.model, args.draft_model
        target, tokenizer = mlx_dllm.load(target_path)
        draft, _ = mlx_dllm.load(draft_path)
    args.block_size = args.block_size or draft.args.block_size
    chat = tokenizer.has_chat_template if args.chat_template is None else args.chat_template
    prompts = [encode(tokenizer, p, chat, vocab_size) for p in read_prompts(args.prompts, args.num_prompts)]

    for _ in range(args.warmup):
        for method in METHODS:
            run_once(method, target, tokenizer, draft, prompts[0], args)
    samples = {m: [] for m in METHODS}
    divergences = []
    for repeat in range(args.repeats):
        for index, prompt in enumerate(prompts):
            outputs = [run_once(m, target, tokenizer, draft, prompt, args) for m in METHODS]
            for m, o in zip(METHODS, outputs):
                samples[m].append(o)
                position = first_divergence(o["tokens"], outputs[0]["tokens"])
                if position is not None:
                    divergences.append({"repeat": repeat, "prompt": index, "method": m, "position": position})
    overheads = {m: [overhead_share(m, target, tokenizer, draft, p, args) for p in prompts] for m in METHODS}

    table = summarize(samples, overheads)
    proj = projection(target, draft, args.block_size, table["dflash"]["acceptance_length"] or 1.0)
    print_report(table, proj, args.block_size, divergences)
    print(
        json.dumps(
            {
                "benchmark": "dflash",
                "methods": table,
                "dflash/mlx_lm": table["dflash"]["vs_mlx_lm"],
                "ours_ar/mlx_lm": table["ours_ar"]["vs_mlx_lm"],
                "dflash/ours_ar": table["dflash"]["vs_ours_ar"],
                "outputs_match": not divergences,
                "divergences": divergences,
                "projection": {
                    "assumed_chips": {c: {"bandwidth_Bps": b, "fp16_flops": f} for c, (b, f) in CHIPS.items()},
                    **proj,
                },
                "mlx": mx.__version__,
                "mlx_lm": mlx_lm.__version__,
                "mlx_dllm": mlx_dllm.__version__,
                "device": str(mx.default_device()),
                "platform": platform.platform(),
                "model": "tiny" if args.tiny else args.model,
                "draft_model": "tiny" if args.tiny else args.draft_model,
                "block_size": args.block_size,
                "max_tokens": args.max_tokens,
                "num_prompts": len(prompts),
                "repeats": args.repeats,
                "chat_template": chat,
                "prompt_tokens_median": median(len(p) for p in prompts),
                "generation_tokens_median": median(s["generation_tokens"] for s in samples["dflash"]),
            }
        )
    )


if __name__ == "__main__":
    try:
        main()
    except mlx_dllm.DLLMError as error:
        raise SystemExit(f"error: {error}")
