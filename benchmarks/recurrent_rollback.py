"""What rolling back a recurrent target costs: time as a share of a verify forward, and memory.

    python benchmarks/recurrent_rollback.py [--block 16] [--context 256] [--trials 7]

On a mid-size random config of each recurrent family (Gated DeltaNet: qwen3_5; Mamba-2: nemotron_h; short
convolutions: lfm2), float32, batch 1, a verify of `--block` tokens over a `--context`-token cache:

- `verify_ms`: the target forward of the block (median), recording what the rollback needs;
- `keep_ms[n]`: `cache.keep(n)` plus evaluating the restored states (median), n = 1 and block / 2;
- `recorded_kb`: what the verify recorded beyond the states before it (the block's convolution inputs and
  per-token recurrence arguments);
- `per_position_kb`: what storing every recurrent state after each block position would hold instead.
"""

import argparse
import importlib
import json
import statistics
import time

import mlx.core as mx

from mlx_dllm.models.recurrent import RecurrentRollback
from mlx_dllm.models.target import Target

VOCAB = 32000
FAMILIES = {
    "qwen3_5 (GDN)": dict(
        model_type="qwen3_5",
        text_config=dict(
            model_type="qwen3_5_text", hidden_size=2048, intermediate_size=6144, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=VOCAB, linear_num_value_heads=32,
            linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
            full_attention_interval=4,
        ),
    ),
    "nemotron_h (Mamba-2)": dict(
        model_type="nemotron_h", vocab_size=VOCAB, hidden_size=2048, intermediate_size=6144,
        max_position_embeddings=4096, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        attention_bias=False, mamba_num_heads=64, mamba_head_dim=64, mamba_proj_bias=False, ssm_state_size=128,
        conv_kernel=4, n_groups=8, mlp_bias=False, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
        hybrid_override_pattern=list("M-M-M*-M-M-M*-"), time_step_limit=(0.0, float("inf")),
    ),
    "lfm2 (short conv)": dict(
        model_type="lfm2", vocab_size=VOCAB, hidden_size=2048, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=4096, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
        block_dim=2048, block_ff_dim=6144, block_multiple_of=256, block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False, full_attn_idxs=[2, 5], rope_theta=1e6,
    ),
}


def build(config):
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def kilobytes(arrays) -> float:
    return sum(a.nbytes for a in arrays if isinstance(a, mx.array)) / 1024


def recorded_kilobytes(rollback: RecurrentRollback) -> float:
    """What a verify recorded for one layer beyond its state before it: the convolution input and the recurrence's
    per-token arguments."""
    arrays = [rollback.conv_input]
    if rollback.replay is not None:
        _, recurrence, arguments = rollback.replay
        arrays += [arguments.get(name) for name in recurrence.per_token]
    return kilobytes(arrays)


def measure(model, block: int, context: int, trials: int):
    target = Target(model, [0])
    cache = target.make_cache()
    ids = mx.random.randint(2, VOCAB - 1, (1, context + block), key=mx.random.key(1))
    mx.eval(target(ids[:, :context], cache)[0], [c.state for c in cache])
    recurrent = [r for r in cache.rollbacks if isinstance(r, RecurrentRollback)]
    prefix = [list(r.cache.cache) for r in recurrent]

    def reset():
        for rollback, states in zip(recurrent, prefix):
            rollback.cache.cache = list(states)
        for layer in cache:
            if hasattr(layer, "offset") and layer.offset > context:
                layer.trim(layer.offset - context)

    def verify():
        cache.mark()
        start = time.perf_counter()
        mx.eval(target(ids[:, context:], cache)[0])
        return 1e3 * (time.perf_counter() - start)

    verify_ms, keep_ms, recorded = [], {1: [], block // 2: []}, 0.0
    for trial in range(trials + 1):
        for n in keep_ms:
            reset()
            elapsed = verify()
            recorded = sum(recorded_kilobytes(r) for r in recurrent)
            start = time.perf_counter()
            cache.keep(n)
            mx.eval([c.state for c in cache])
            if trial:  # the first round warms up
                verify_ms.append(elapsed)
                keep_ms[n].append(1e3 * (time.perf_counter() - start))
    states = sum(kilobytes(states) for states in prefix)
    median = statistics.median(verify_ms)
    return {
        "recurrent_layers": len(recurrent),
        "verify_ms": round(median, 2),
        **{f"keep_ms[{n}]": round(statistics.median(v), 3) for n, v in keep_ms.items()},
        **{f"keep_share[{n}]": f"{statistics.median(v) / median:.1%}" for n, v in keep_ms.items()},
        "state_kb": round(states, 1),
        "recorded_kb": round(recorded, 1),
        "per_position_kb": round(block * states, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    for name, config in FAMILIES.items():
        row = measure(build(config), args.block, args.context, args.trials)
        print(json.dumps({"family": name, "block": args.block, **row}))


if __name__ == "__main__":
    main()
