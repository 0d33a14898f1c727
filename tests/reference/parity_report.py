"""Print the drafter's max abs error against the transformers reference for each parity case.

python -m tests.reference.parity_report
"""

import tempfile
from pathlib import Path

from mlx_dllm import convert, load
from tests import test_dflash_model as cases
from tests.reference import harness

CASES = {
    "full attention, fresh cache": ({}, [7]),
    "full attention, incremental": ({}, [7, 3, 1, 5]),
    "sliding window 4, incremental": (
        {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4},
        [9, 3, 2, 6],
    ),
    "llama3 RoPE": ({"rope_parameters": cases.ROPE_VARIANTS["llama3"]}, [70, 3, 40]),
    "YaRN RoPE": ({"rope_parameters": cases.ROPE_VARIANTS["yarn"]}, [70, 3, 40]),
}


def main() -> None:
    root = Path(tempfile.mkdtemp())
    target = harness.build_target("qwen3_gqa", root / "target")
    for index, (name, (options, lengths)) in enumerate(CASES.items()):
        reference = harness.build_draft(target.config, root / f"hf{index}", **options)
        draft, _ = load(str(convert(root / f"hf{index}", root / f"mlx{index}")))
        calls = cases._random_calls(reference.config, lengths, block_size=8, seed=5)
        errors, _ = cases._max_errors(reference, draft, calls)
        per_call = ", ".join(f"{e:.1e}" for e in errors)
        print(f"{name} (context rows {lengths}): max abs error {max(errors):.1e} (per call {per_call})")


if __name__ == "__main__":
    main()
