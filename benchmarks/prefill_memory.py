"""Peak memory of the prompt's prefill (and the first token), ours vs mlx-lm's `generate_step`, per family.

Tiny-hidden, large-vocabulary random models make the head the dominant cost, so a prefill that evaluates the
head for every prompt row (instead of the last one only) shows at once:

    python benchmarks/prefill_memory.py [--prompt-tokens 4096] [--vocab 65536] [--step 2048]

DiffusionGemma has no mlx-lm counterpart; its row compares against mlx-lm on the Qwen3 model of the same size.
"""

import argparse
import json

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen3

from mlx_dllm.models import dflash, diffusion_gemma, nemotron_diffusion
from mlx_dllm.sampler.common import Stats, make_token_selector
from mlx_dllm.sampler.mode import modes_of

HIDDEN, LAYERS, HEADS = 64, 2, 4


def qwen3_model(vocab: int):
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=128,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        vocab_size=vocab,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    return qwen3.Model(args)


def dflash_drafter(vocab: int):
    args = dflash.ModelArgs(
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
        block_size=4,
        mask_token_id=vocab - 1,
        target_layer_ids=[0, 1],
    )
    return dflash.Model(args)


def nemotron_model(vocab: int):
    args = nemotron_diffusion.ModelArgs(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=128,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=vocab,
        max_position_embeddings=32768,
        mask_token_id=vocab - 1,
    )
    return nemotron_diffusion.Model(args)


def diffusion_gemma_model(vocab: int):
    text = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=128,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=vocab,
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=64,
        head_dim=16,
        global_head_dim=32,
        sliding_window=64,
    )
    return diffusion_gemma.Model(diffusion_gemma.ModelArgs(text_config=text, canvas_length=4))


def peak_mb(run) -> float:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    run()
    mx.synchronize()
    return mx.get_peak_memory() / 2**20


def mlx_lm_prefill(model, prompt, step: int) -> float:
    return peak_mb(lambda: next(generate_step(prompt, model, max_tokens=1, prefill_step_size=step)))


def our_prefill(model, prompt, mode: str, step: int, draft_model=None) -> float:
    """The strategy's first yield: the prefill and the token its last logit selects."""

    def run():
        strategy = modes_of(model)[mode].run(
            model,
            prompt,
            draft_model=draft_model,
            select=make_token_selector(),
            stats=Stats(),
            max_tokens=1,
            prefill_step_size=step,
            eos_token_ids=set(),
            options={"stability_threshold": None} if mode == "diffusion" else {},
        )
        next(strategy)
        strategy.close()

    return peak_mb(run)


def measure(prompt_tokens: int, vocab: int, step: int) -> dict:
    mx.random.seed(0)
    prompt = mx.random.randint(0, vocab - 1, (prompt_tokens,))
    target, nemotron, gemma = qwen3_model(vocab), nemotron_model(vocab), diffusion_gemma_model(vocab)
    drafter = dflash_drafter(vocab)
    mx.eval(target.parameters(), nemotron.parameters(), gemma.parameters(), drafter.parameters(), prompt)
    rows = {
        "ar": (our_prefill(target, prompt, "ar", step), mlx_lm_prefill(target, prompt, step)),
        "dflash": (our_prefill(target, prompt, "dflash", step, drafter), mlx_lm_prefill(target, prompt, step)),
        "nemotron": (our_prefill(nemotron, prompt, "linear-spec", step), mlx_lm_prefill(nemotron, prompt, step)),
        "diffusion_gemma": (our_prefill(gemma, prompt, "diffusion", step), mlx_lm_prefill(target, prompt, step)),
    }
    return {
        name: {"ours_mb": round(ours, 1), "mlx_lm_mb": round(theirs, 1), "ratio": round(ours / theirs, 2)}
        for name, (ours, theirs) in rows.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--step", type=int, default=2048)
    args = parser.parse_args()
    results = measure(args.prompt_tokens, args.vocab, args.step)
    for name, row in results.items():
        ours, theirs = row["ours_mb"], row["mlx_lm_mb"]
        print(f"{name:>16}: ours {ours:8.1f} MB   mlx-lm {theirs:8.1f} MB   ratio {row['ratio']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
