"""Nemotron-Labs-Diffusion: all four modes (ar, diffusion, linear-spec, quadratic-spec) in one process on the
same weights, plus mlx-lm plain generation as the outside AR baseline.

    python benchmarks/nemotron_diffusion.py                  # tiny random checkpoint with a LoRA (needs torch)
    python benchmarks/nemotron_diffusion.py --project-8b     # + a roofline projection for the published 8B
    python benchmarks/nemotron_diffusion.py --model PATH     # a converted checkpoint (chat template applied)

All runs are greedy and ignore EOS, so every run yields exactly --max-tokens tokens. Per mode: generation tok/s
(median) and its ratio to `ar` (median of per-prompt pairs, the modes interleaved), tokens per forward, acceptance
length, peak memory and whether the output equals `ar`'s. Then the cost of one model forward of each kind at the
same cache length (a quadratic layout forward against one linear-spec cycle), a roofline projection for Apple GPUs,
and which mode is fastest here and projected fastest there. Prints a table and one final JSON line. Random tiny
weights accept ~1 token per cycle, so there the speculative modes lose: the tiny run checks plumbing and costs.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.utils import get_total_parameters

import mlx_dllm
from mlx_dllm.models.nemotron_diffusion import Model as NemotronDiffusion
from mlx_dllm.sampler.quadratic_spec import quadratic_mask
from common import CHIPS, DATA, encode, fmt, median, read_prompts  # benchmarks/common.py, beside this script

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")
METHODS = ("mlx_lm",) + MODES
LOSSLESS = ("ar", "linear-spec", "quadratic-spec")  # greedy output must equal AR's; diffusion's need not
# The published 8B (research dossier section 0): 34 layers, hidden 4096, MLP 14336, 32 query / 8 KV heads of
# 128, vocab 131072, untied head, bf16; LoRA r 128 on o_proj (fp32 on disk, bf16 assumed in use).
NLD_8B = {"layers": 34, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
NLD_8B_VOCAB, NLD_8B_LORA_R, NLD_8B_BLOCK = 131072, 128, 32
# Vendor-reported 8B Instruct TPF (10-task average). Linear's 5.99 is read as tokens per draft+verify cycle
# (the dossier's inference: the paper's "real TPF" 3.41 = 6.82 / 2); quadratic's 6.38 and diffusion's 2.57 are
# per forward (diffusion: denoising steps and commits alike).
PAPER_TPF = {"ar": 1.0, "diffusion": 2.57, "linear-spec": 5.99, "quadratic-spec": 6.38}


def tiny_overrides(args) -> dict:
    """Ministral3 text-config overrides for the builder; a flag left unset keeps the builder's own value."""
    overrides = {}
    if args.hidden:
        overrides.update(hidden_size=args.hidden, intermediate_size=2 * args.hidden, head_dim=max(8, args.hidden // 2))
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    return overrides


def build_tiny(root: Path, args) -> int:
    """A tiny random NLD checkpoint with a LoRA adapter, saved by the torch reference builder; its vocab size."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the reference builder lives in tests/
    try:
        from transformers.utils.logging import disable_progress_bar, set_verbosity_error

        from tests.reference import nemotron
    except ImportError as error:
        raise SystemExit(f"--tiny needs torch and transformers ({error})")
    disable_progress_bar()
    set_verbosity_error()  # the builder's Ministral3Config warns about the NLD-only rope key
    options = {"block_size": args.block_length} if args.block_length else {}
    reference = nemotron.build_checkpoint(root, **options, **tiny_overrides(args))
    return reference.config.vocab_size


# ---------------------------------------------------------------------------------------------- runs


def mode_options(mode: str, model, args) -> dict:
    if mode == "ar":
        return {}
    options = {"block_length": args.block_length}
    if mode == "diffusion":
        options["threshold"] = args.threshold
    elif mode == "linear-spec":
        options.update(lora=args.lora, threshold=args.draft_threshold)
    return options


def run_once(method: str, model, tokenizer, prompt: list, args) -> dict:
    """One greedy generation of exactly max_tokens tokens; numbers as each API reports them."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    if method == "mlx_lm":
        responses = list(mlx_lm_stream_generate(model, tokenizer, prompt, args.max_tokens))
        tokens = [r.token for r in responses]
    else:
        options = mode_options(method, model, args)
        responses = list(mlx_dllm.stream_generate(model, tokenizer, prompt, args.max_tokens, mode=method, **options))
        tokens = [t for r in responses for t in r.tokens]
    wall = time.perf_counter() - start
    last = responses[-1]
    # Decoding forwards, the prefill excluded (mlx-lm: one per token after the first).
    cycles = getattr(last, "forwards", len(tokens) - 1)
    forwards = cycles + 1  # every strategy here prefills the prompt in one forward (<= 2048 tokens)
    draft_forwards = getattr(last, "draft_forwards", 0)
    cycles = max(cycles, 1)
    return {
        "generation_tps": last.generation_tps,
        "e2e_tps": len(tokens) / wall,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "tokens_per_forward": len(tokens) / forwards,
        "decode_tokens_per_forward": getattr(last, "tokens_per_forward", 1.0),
        "tokens_per_model_call": len(tokens) / max(forwards + draft_forwards, 1),
        "acceptance_length": getattr(last, "acceptance_length", None),
        "forwards": forwards,
        "draft_forwards": draft_forwards,
        "drafts_per_cycle": draft_forwards / cycles if method == "linear-spec" else None,
        "wall_s": wall,
        "tokens": tokens,
    }


def first_divergence(tokens, reference):
    if tokens == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def agreement(tokens, reference) -> float:
    """Share of positions where the tokens equal the reference's."""
    return sum(a == b for a, b in zip(tokens, reference)) / max(len(reference), 1)


# ---------------------------------------------------------------------------------------------- forward costs


def forward_costs(model, prompt: list, block: int, lora: bool, trials: int) -> dict:
    """Median ms of one forward of each kind at the same cache length (the prompt prefilled), each evaluated
    alone (mx.eval), kinds interleaved; K/V a forward writes is trimmed again, so the cache length stays put.

    ar: 1 token causal. causal(B): linear-spec verify and diffusion commit. bidirectional(B): a diffusion step.
    draft(B): bidirectional with the LoRA (linear-spec draft). quadratic: the B x (B+1) layout with its mask and
    row offsets, head=False, then the head on the 2B-1 rows the strategy reads (B verify rows + B-1 masks)."""
    cache = model.make_cache()
    mx.eval(model(mx.array([prompt]), cache))
    committed = cache[0].offset
    mask_id = model.args.mask_token_id
    seed = prompt[-1]
    ids = mx.array([[seed] + [mask_id] * (block - 1)])
    drafted = mx.array([[seed] + [(seed + 1 + i) % mask_id for i in range(block - 1)]])
    layout_tokens = block * (block + 1)
    layout = mx.array([[t for i in range(block) for t in [(seed + i) % mask_id] + [mask_id] * block]])
    mask = mx.concatenate([mx.ones((layout_tokens, committed), dtype=mx.bool_), quadratic_mask(block)], axis=1)
    offsets = committed + mx.arange(block)
    mx.eval(ids, drafted, layout, mask, offsets)

    def trim(count):
        for layer_cache in cache:
            layer_cache.trim(count)

    def ar():
        mx.eval(model(mx.array([[seed]]), cache))
        trim(1)

    def causal():
        mx.eval(model(drafted, cache))
        trim(block)

    def bidirectional():
        mx.eval(model(ids, cache, pattern="bidirectional", write_cache=False))

    def draft():
        mx.eval(model(ids, cache, pattern="bidirectional", write_cache=False, lora=lora))

    def quadratic():
        hidden = model(layout, cache, pattern=mask, row_offsets=offsets, head=False)[0].reshape(block, block + 1, -1)
        rows = mx.concatenate([hidden[:, 0], hidden[0, 2:]])  # verify rows + one row's masks after the bonus
        mx.eval(model.diffusion_head(rows))
        trim(layout_tokens)

    kinds = {"ar": ar, "causal": causal, "bidirectional": bidirectional, "draft": draft, "quadratic": quadratic}
    times = {k: [] for k in kinds}
    for trial in range(trials + 3):  # the first three warm up
        for kind, call in kinds.items():
            start = time.perf_counter()
            call()
            if trial >= 3:
                times[kind].append(1e3 * (time.perf_counter() - start))
            assert cache[0].offset == committed
    costs = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
    costs["linear_cycle_ms"] = costs["draft_ms"] + costs["causal_ms"]
    costs["quadratic_over_linear_cycle"] = costs["quadratic_ms"] / costs["linear_cycle_ms"]
    costs["cache_length"] = committed
    costs["layout_tokens"] = layout_tokens
    return costs


# ---------------------------------------------------------------------------------------------- roofline


def model_shape(model) -> dict:
    """Parameter counts and bytes of the loaded model by part (quantized weights count unpacked params)."""
    lora_params = lora_bytes = 0
    for layer in model.layers:
        if layer.self_attn.lora is not None:
            for _, v in tree_flatten(layer.self_attn.lora.parameters()):
                lora_params += v.size
                lora_bytes += v.nbytes
    embed = model.encoder.embed_tokens
    embed_bytes = sum(v.nbytes for _, v in tree_flatten(embed.parameters()))
    head_bytes = sum(v.nbytes for _, v in tree_flatten(model.diffusion_head.parameters()))
    all_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    embed_params = get_total_parameters(embed)
    head_params = get_total_parameters(model.diffusion_head)
    a = model.args
    return {
        "params": get_total_parameters(model) - lora_params,
        "backbone_params": get_total_parameters(model.encoder) - lora_params - embed_params,
        "backbone_bytes": all_bytes - lora_bytes - embed_bytes - head_bytes,
        "head_params": head_params,
        "head_bytes": head_bytes,
        "embed_params": embed_params,
        "lora_params": lora_params,
        "lora_bytes": lora_bytes,
        "layers": a.num_hidden_layers,
        "heads": a.num_attention_heads,
        "kv_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "kv_bytes_per_element": model.layers[0].self_attn.k_proj.weight.dtype.size
        if model.layers[0].self_attn.k_proj.weight.dtype in (mx.float16, mx.bfloat16, mx.float32)
        else 2,
    }


def shape_8b() -> dict:
    s = NLD_8B
    attention = s["hidden"] * s["head_dim"] * (2 * s["heads"] + 2 * s["kv_heads"])
    layer = attention + 3 * s["hidden"] * s["intermediate"] + 2 * s["hidden"]
    backbone = s["layers"] * layer + s["hidden"]
    head = embed = NLD_8B_VOCAB * s["hidden"]
    lora = s["layers"] * NLD_8B_LORA_R * (s["heads"] * s["head_dim"] + s["hidden"])
    return {
        "params": backbone + head + embed,
        "backbone_params": backbone,
        "backbone_bytes": 2 * backbone,
        "head_params": head,
        "head_bytes": 2 * head,
        "embed_params": embed,
        "lora_params": lora,
        "lora_bytes": 2 * lora,
        "layers": s["layers"],
        "heads": s["heads"],
        "kv_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "kv_bytes_per_element": 2,
    }


def forward_seconds(shape, chip, tokens, context, head_rows=None, lora=False) -> float:
    """Roofline time of one forward of `tokens` queries after `context` cached tokens: max(bytes / bandwidth,
    FLOPs / peak). Bytes: backbone + head weights (the embedding is a gather), the LoRA if on, the K/V read.
    FLOPs: 2 x params x rows for the matmuls (the head on `head_rows`), dense attention 4 x Lq x Lk x heads x dim."""
    bandwidth, peak = CHIPS[chip]
    head_rows = tokens if head_rows is None else head_rows
    keys = context + tokens
    kv_bytes = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * keys * shape["kv_bytes_per_element"]
    nbytes = shape["backbone_bytes"] + shape["head_bytes"] + kv_bytes + (shape["lora_bytes"] if lora else 0)
    flops = 2 * shape["backbone_params"] * tokens + 2 * shape["head_params"] * head_rows
    flops += 4 * shape["layers"] * shape["heads"] * shape["head_dim"] * tokens * keys
    if lora:
        flops += 2 * shape["lora_params"] * tokens
    return max(nbytes / bandwidth, flops / peak)


def projection(shape, block: int, context: int, per_cycle: dict, lora: bool, drafts_per_cycle: float) -> dict:
    """Projected speedup over AR per chip and mode: tokens per cycle x t_AR / t_cycle, where the cycle is
    ar: 1 token; diffusion: one B-token forward (step or commit; tokens per cycle = tokens per such forward);
    linear-spec: drafts x draft(B, LoRA) + verify(B); quadratic-spec: one B(B+1)-token forward, head on 2B-1 rows.
    `per_cycle` gives the tokens per cycle of each mode."""
    chips = {}
    for chip in CHIPS:
        t_ar = forward_seconds(shape, chip, 1, context)
        t_block = forward_seconds(shape, chip, block, context)
        cycle = {
            "ar": t_ar,
            "diffusion": t_block,
            "linear-spec": drafts_per_cycle * forward_seconds(shape, chip, block, context, lora=lora) + t_block,
            "quadratic-spec": forward_seconds(shape, chip, block * (block + 1), context, head_rows=2 * block - 1),
        }
        chips[chip] = {
            "t_ar_ms": 1e3 * t_ar,
            "cycle_ms": {m: 1e3 * t for m, t in cycle.items()},
            "speedup": {m: per_cycle[m] * t_ar / cycle[m] for m in MODES},
            "break_even_tokens_per_cycle": {m: cycle[m] / t_ar for m in MODES},
        }
    return {
        "params": shape["params"],
        "weight_bytes_per_forward": shape["backbone_bytes"] + shape["head_bytes"],
        "lora_params": shape["lora_params"],
        "block_length": block,
        "context": context,
        "tokens_per_cycle": per_cycle,
        "drafts_per_cycle": drafts_per_cycle,
        "chips": chips,
    }


def fastest(speedups: dict, modes) -> str:
    return max(modes, key=lambda m: speedups[m])


def projected_fastest(proj: dict, modes) -> str:
    """The mode fastest on most chips (ties: the higher mean projected speedup)."""
    wins = [fastest(r["speedup"], modes) for r in proj["chips"].values()]
    mean = {m: statistics.fmean(r["speedup"][m] for r in proj["chips"].values()) for m in modes}
    return max(set(wins), key=lambda m: (wins.count(m), mean[m]))


# ---------------------------------------------------------------------------------------------- report


def summarize(samples: dict, ratios: dict, agreements: dict) -> dict:
    keys = (
        "generation_tps", "e2e_tps", "peak_memory_gb", "tokens_per_forward", "decode_tokens_per_forward",
        "tokens_per_model_call", "acceptance_length", "drafts_per_cycle",
    )  # fmt: skip
    table = {m: {k: median(s[k] for s in samples[m]) for k in keys} for m in METHODS}
    for m in METHODS:
        table[m]["vs_ar"] = median(ratios[m])
        table[m]["agreement_with_ar"] = statistics.fmean(agreements[m])
        table[m]["matches_ar"] = all(a == 1.0 for a in agreements[m])
    return table


def print_table(table: dict, args) -> None:
    print(
        f"\n{'method':<15} {'gen tok/s':>9} {'/ar':>6} {'e2e tok/s':>9} {'tok/fwd':>7} {'decode':>6} "
        f"{'tok/call':>8} {'accept':>6} {'peak MB':>8} {'= ar':>6}"
    )
    for m in METHODS:
        r = table[m]
        same = "yes" if r["matches_ar"] else f"{r['agreement_with_ar']:.0%}"
        print(
            f"{m:<15} {r['generation_tps']:>9.1f} {r['vs_ar']:>6.2f} {r['e2e_tps']:>9.1f} "
            f"{r['tokens_per_forward']:>7.2f} {r['decode_tokens_per_forward']:>6.2f} "
            f"{r['tokens_per_model_call']:>8.2f} "
            f"{fmt(r['acceptance_length'], '.2f'):>6} {1e3 * r['peak_memory_gb']:>8.2f} {same:>6}"
        )
    print(
        f"\nMedians over {args.repeats} repeat(s) x {args.num_prompts} prompt(s), {args.max_tokens} tokens each (EOS "
        f"ignored), block length {args.block_length}, measured on {mx.default_device()}.\n"
        "/ar = median over (repeat, prompt) of gen tok/s / ar's gen tok/s in the same round (modes interleaved).\n"
        "tok/fwd = tokens / counted forwards as the API reports them (prefill included; linear-spec counts verify\n"
        "  forwards only, so it is tokens per draft+verify cycle; diffusion counts denoising steps and commits);\n"
        "  decode = the same without the prefill; tok/call = tokens / every model call (linear-spec drafts and\n"
        "  quadratic's initial draft included). accept = tokens committed per verify cycle (spec modes).\n"
        "= ar: greedy output identical to ar's in every run (lossless), else the share of positions that agree."
    )


def print_costs(costs: dict, args) -> None:
    print(
        f"\nForward costs on {mx.default_device()} (median ms, each forward evaluated alone, cache length "
        f"{costs['cache_length']}, B = {args.block_length}):"
    )
    print(
        f"  ar 1 token {costs['ar_ms']:.2f} | causal B {costs['causal_ms']:.2f} | bidirectional B "
        f"{costs['bidirectional_ms']:.2f} | draft B (LoRA {'on' if args.lora else 'off'}) {costs['draft_ms']:.2f} | "
        f"quadratic {costs['layout_tokens']} tokens {costs['quadratic_ms']:.2f}"
    )
    print(
        f"  one quadratic forward / one linear-spec cycle (draft B + verify B) = {costs['quadratic_ms']:.2f} / "
        f"{costs['linear_cycle_ms']:.2f} = {costs['quadratic_over_linear_cycle']:.2f}x"
    )


def print_projection(title: str, proj: dict) -> None:
    print(f"\nPROJECTION (not a measurement): {title}")
    print(
        f"  {count(proj['params'])} params, {count(proj['weight_bytes_per_forward'])}B of weights read per forward "
        f"(embedding excluded), LoRA {count(proj['lora_params'])}; B = {proj['block_length']}, "
        f"context {proj['context']}; tokens per cycle: "
        + ", ".join(f"{m} {v:.2f}" for m, v in proj["tokens_per_cycle"].items())
    )
    print(f"  {'chip (assumed)':<32} {'t_AR ms':>8} " + " ".join(f"{m:>15}" for m in MODES))
    for chip, r in proj["chips"].items():
        bandwidth, flops = CHIPS[chip]
        label = f"{chip} {bandwidth / 1e9:.0f} GB/s {flops / 1e12:.0f} TFLOPs"
        print(f"  {label:<32} {r['t_ar_ms']:>8.3f} " + " ".join(f"{r['speedup'][m]:>14.2f}x" for m in MODES))
    first, r = next(iter(proj["chips"].items()))
    print(f"  on {first}: cycle ms " + ", ".join(f"{m} {v:.3g}" for m, v in r["cycle_ms"].items()))
    print(
        "    break-even tokens per cycle "
        + ", ".join(f"{m} {v:.2f}" for m, v in r["break_even_tokens_per_cycle"].items() if m != "ar")
    )


def count(value) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f} "


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a converted Nemotron-Labs-Diffusion checkpoint: path or hub id")
    source.add_argument("--tiny", action="store_true", help="tiny random checkpoint with a LoRA (the default)")
    size = parser.add_argument_group("tiny config (default: the test builder's: hidden 64, 3 layers, vocab 256)")
    size.add_argument("--hidden", type=int, help="hidden size (MLP 2x, 4 heads of hidden/2)")
    size.add_argument("--layers", type=int, help="decoder layers")
    size.add_argument("--vocab", type=int, help="vocabulary size (> 100, the mask id; the tokenizer names ids < 256)")
    parser.add_argument("--prompts", type=Path, default=DATA / "gsm8k_test.jsonl", help="jsonl or text file")
    parser.add_argument("--num-prompts", type=int, default=5)
    parser.add_argument("--max-tokens", "-m", type=int, default=64)
    parser.add_argument("--block-length", type=int, help="default: the model's block size (tiny: 8)")
    parser.add_argument("--threshold", type=float, default=0.9, help="diffusion confidence threshold")
    parser.add_argument("--draft-threshold", type=float, default=0.0, help="linear-spec draft threshold (0: 1 pass)")
    parser.add_argument("--no-lora", action="store_true", help="linear-spec drafts without the LoRA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cost-trials", type=int, default=30, help="timed forwards per kind for the cost table")
    parser.add_argument("--context", type=int, help="projection's cache length (default: prompt + max_tokens / 2)")
    parser.add_argument("--project-8b", action="store_true", help="also project the published 8B with paper TPF")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the tokenizer's chat template (default: when it has one; --model only)",
    )
    args = parser.parse_args()
    args.tiny = args.model is None
    if not args.tiny and any((args.hidden, args.layers, args.vocab)):
        parser.error("the tiny-config flags need --tiny")
    if args.vocab is not None and args.vocab <= 101:
        parser.error("--vocab must exceed 101 (the mask id is 100)")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = build_tiny(Path(tmp), args) if args.tiny else 0
        model, tokenizer = mlx_dllm.load(tmp if args.tiny else args.model)
    if not isinstance(model, NemotronDiffusion):
        raise SystemExit(f"{args.model} is not a Nemotron-Labs-Diffusion checkpoint")
    args.block_length = args.block_length or model.args.block_size
    args.lora = model.has_lora and not args.no_lora
    tokenizer.eos_token_ids = set()  # every run then yields exactly max_tokens tokens
    chat = bool(tokenizer.has_chat_template if args.chat_template is None else args.chat_template) and not args.tiny
    prompts = [encode(tokenizer, p, chat, vocab) for p in read_prompts(args.prompts, args.num_prompts)]
    args.num_prompts = len(prompts)

    for _ in range(args.warmup):
        for method in METHODS:
            run_once(method, model, tokenizer, prompts[0], args)
    samples = {m: [] for m in METHODS}
    ratios = {m: [] for m in METHODS}
    agreements = {m: [] for m in METHODS}
    divergences = []
    for repeat in range(args.repeats):
        for index, prompt in enumerate(prompts):
            order = METHODS if (repeat + index) % 2 == 0 else METHODS[::-1]  # alternate, so drift hits all alike
            outputs = {m: run_once(m, model, tokenizer, prompt, args) for m in order}
            reference = outputs["ar"]
            for m in METHODS:
                o = outputs[m]
                samples[m].append(o)
                ratios[m].append(o["generation_tps"] / reference["generation_tps"])
                agreements[m].append(agreement(o["tokens"], reference["tokens"]))
                position = first_divergence(o["tokens"], reference["tokens"])
                if position is not None and m != "diffusion":
                    divergences.append({"repeat": repeat, "prompt": index, "method": m, "position": position})
    costs = forward_costs(model, prompts[0], args.block_length, args.lora, args.cost_trials)
    table = summarize(samples, ratios, agreements)

    prompt_tokens = median(len(p) for p in prompts)
    context = args.context if args.context is not None else int(prompt_tokens + args.max_tokens // 2)
    measured = {
        "ar": 1.0,
        "diffusion": table["diffusion"]["decode_tokens_per_forward"],
        "linear-spec": table["linear-spec"]["acceptance_length"] or 1.0,
        "quadratic-spec": table["quadratic-spec"]["acceptance_length"] or 1.0,
    }
    drafts = table["linear-spec"]["drafts_per_cycle"] or 1.0
    proj = projection(model_shape(model), args.block_length, context, measured, args.lora, drafts)
    proj_8b = projection(shape_8b(), NLD_8B_BLOCK, context, PAPER_TPF, True, 1.0) if args.project_8b else None
    elapsed = time.perf_counter() - started

    print_table(table, args)
    for d in divergences:
        where = f"token {d['position']} (prompt {d['prompt']}, repeat {d['repeat']})"
        print(f"  WARNING: {d['method']} differs from ar at {where}")
    print_costs(costs, args)
    block_ms = statistics.fmean([costs["bidirectional_ms"], costs["causal_ms"]])  # a diffusion step or commit
    cpu_projected = {
        "ar": 1.0,
        "diffusion": measured["diffusion"] * costs["ar_ms"] / block_ms,
        "linear-spec": measured["linear-spec"] * costs["ar_ms"] / (drafts * costs["draft_ms"] + costs["causal_ms"]),
        "quadratic-spec": measured["quadratic-spec"] * costs["ar_ms"] / costs["quadratic_ms"],
    }
    print(
        "  forward-cost model here (tokens per cycle x t_ar / t_cycle, sampler overhead excluded): "
        + ", ".join(f"{m} {v:.2f}x" for m, v in cpu_projected.items())
    )
    print(
        "\nRoofline per forward: max(weight bytes / bandwidth, FLOPs / peak), bytes = backbone + head weights "
        "(+ LoRA on drafts) + K/V read,\n  FLOPs = 2 x params x tokens (head on the rows used) + dense attention; "
        "ignores launch costs, the sampler and the\n  quadratic's initial draft. "
        "Speedup = tokens per cycle x t_AR / t_cycle; linear cycle = drafts x draft(B) + verify(B),\n  "
        "quadratic = one B(B+1)-token forward, diffusion = one B-token forward (step or commit)."
    )
    print_projection(f"this model ({'tiny random' if args.tiny else args.model}), measured tokens per cycle", proj)
    if proj_8b:
        print_projection(
            "published 8B (8.49B params, bf16), paper TPF (linear 5.99 read as per draft+verify cycle), block 32",
            proj_8b,
        )

    lossless = [m for m in LOSSLESS if table[m]["matches_ar"]]
    measured_fastest = fastest({m: table[m]["generation_tps"] for m in MODES}, MODES)
    measured_fastest_lossless = fastest({m: table[m]["generation_tps"] for m in lossless}, lossless)
    proj_fastest = projected_fastest(proj, MODES)
    proj_fastest_lossless = projected_fastest(proj, lossless)
    if proj_8b:
        basis, recommended = "the 8B projection with the paper's TPF", projected_fastest(proj_8b, lossless)
    elif args.tiny:  # random weights accept ~1 token per cycle: their projection says nothing about a real model
        basis, recommended = "none: random tiny weights (rerun with --project-8b or --model)", None
    else:
        basis, recommended = "this model's projection (measured tokens per cycle)", proj_fastest_lossless
    print(
        f"\nMeasured here ({mx.default_device()}): fastest mode {measured_fastest}, fastest lossless "
        f"{measured_fastest_lossless} ({table[measured_fastest_lossless]['vs_ar']:.2f}x ar)."
    )
    print(f"Projected (Apple GPUs, this model): fastest {proj_fastest}, fastest lossless {proj_fastest_lossless}.")
    if proj_8b:
        print(
            f"Projected (Apple GPUs, 8B with paper TPF): fastest {projected_fastest(proj_8b, MODES)}, "
            f"fastest lossless {recommended}."
        )
    default = NemotronDiffusion.default_mode
    if recommended is None:
        print(
            "Recommended default mode: none from this run; random tiny weights accept ~1 token per cycle, so every "
            f"speculative mode loses here and in their projection (rerun with --project-8b or --model). "
            f"Model.default_mode is '{default}'."
        )
    else:
        print(
            f"Recommended default mode (fastest lossless), from {basis}: {recommended}. Model.default_mode is "
            f"'{default}'" + (" (agrees)." if recommended == default else " (differs).")
        )
    print(f"Measured in {elapsed:.1f} s.")

    config = model.args
    print(
        json.dumps(
            {
                "benchmark": "nemotron_diffusion",
                "methods": table,
                "outputs_match": {m: table[m]["matches_ar"] for m in METHODS},
                "divergences": divergences,
                "forward_costs": costs,
                "quadratic_over_linear_cycle": costs["quadratic_over_linear_cycle"],
                "cpu_cost_model_speedup": cpu_projected,
                "projection": {
                    "assumed_chips": {c: {"bandwidth_Bps": b, "fp16_flops": f} for c, (b, f) in CHIPS.items()},
                    "model": proj,
                    "nld_8b_paper_tpf": proj_8b,
                },
                "measured_fastest": measured_fastest,
                "measured_fastest_lossless": measured_fastest_lossless,
                "projected_fastest": proj_fastest,
                "projected_fastest_lossless": proj_fastest_lossless,
                "projected_fastest_lossless_8b": recommended if proj_8b else None,
                "recommended_default_mode": recommended,
                "recommendation_basis": basis,
                "model_default_mode": NemotronDiffusion.default_mode,
                "mlx": mx.__version__,
                "mlx_lm": mlx_lm.__version__,
                "mlx_dllm": mlx_dllm.__version__,
                "device": str(mx.default_device()),
                "platform": platform.platform(),
                "model": "tiny" if args.tiny else args.model,
                "config": {
                    "hidden_size": config.hidden_size,
                    "num_hidden_layers": config.num_hidden_layers,
                    "vocab_size": config.vocab_size,
                    "block_size": config.block_size,
                    "has_lora": model.has_lora,
                },
                "block_length": args.block_length,
                "threshold": args.threshold,
                "draft_threshold": args.draft_threshold,
                "lora": args.lora,
                "max_tokens": args.max_tokens,
                "num_prompts": len(prompts),
                "repeats": args.repeats,
                "warmup": args.warmup,
                "chat_template": chat,
                "prompt_tokens_median": prompt_tokens,
                "context": context,
                "measure_s": elapsed,
            }
        )
    )


if __name__ == "__main__":
    try:
        main()
    except mlx_dllm.DLLMError as error:
        raise SystemExit(f"error: {error}")
