"""Medians, ratios to the mlx-lm baseline of the same run, the table and the one JSON line."""

import json
import statistics
from typing import Dict, List, Optional, Set

from .runner import MLX_LM, Sample


def median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mean_rounds(samples: List[Sample]) -> Optional[Dict[str, float]]:
    """DFlash's round shares (and mean budget), averaged over the runs that report them."""
    reported = [s.speculation for s in samples if s.speculation]
    if not reported:
        return None
    return {key: round(statistics.mean(r[key] for r in reported), 3) for key in reported[0]}


def paired_ratio(samples: List[Sample], baseline: List[Sample]) -> Optional[float]:
    """Median over runs of this method's tokens/s over the baseline's on the same prompt and repeat."""
    return median(s.generation_tps / b.generation_tps for s, b in zip(samples, baseline) if b.generation_tps > 0)


def summarize(
    samples: Dict[str, List[Sample]], mismatches: List[dict], outside: Dict[str, float], lossless: Set[str]
) -> Dict[str, dict]:
    baseline_name = MLX_LM if MLX_LM in samples else None
    table = {}
    for method, runs in samples.items():
        diverged = sum(1 for m in mismatches if m["method"] == method)
        table[method] = {
            "generation_tps": median(s.generation_tps for s in runs),
            "prompt_tps": median(s.prompt_tps for s in runs),
            "tokens_per_forward": median(s.tokens_per_forward for s in runs),
            "acceptance_length": median(s.acceptance_length for s in runs),
            "peak_memory_gb": max(s.peak_memory_gb for s in runs),
            "generation_tokens": median(len(s.tokens) for s in runs),
            "outside_forward_share": outside.get(method),
            "vs_mlx_lm": paired_ratio(runs, samples[baseline_name]) if baseline_name else None,
            "identical_output": (diverged == 0) if method in lossless and method != baseline_name else None,
            "rounds": mean_rounds(runs),
        }
    return table


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def identical_cell(value: Optional[bool]) -> str:
    return "-" if value is None else ("yes" if value else "MISMATCH")


def rounds_cell(rounds: Optional[Dict[str, float]]) -> str:
    """Shares of AR / chain / tree rounds in percent, and the mean budget: "10/60/30 b4.2"."""
    if not rounds:
        return "-"
    shares = "/".join(f"{100 * rounds[kind]:.0f}" for kind in ("ar", "chain", "tree"))
    return f"{shares} b{rounds['mean_budget']:.1f}"


def table_lines(table: Dict[str, dict]) -> List[str]:
    width = max([15] + [len(method) for method in table])
    header = (
        f"{'method':<{width}} {'gen tok/s':>10} {'prompt tok/s':>12} {'tok/fwd':>8} {'accept':>7} "
        f"{'peak GB':>8} {'outside':>8} {'vs mlx_lm':>9} {'= mlx_lm':>9} {'ar/chain/tree':>16}"
    )
    lines = [header]
    for method, row in table.items():
        lines.append(
            f"{method:<{width}} {fmt(row['generation_tps'], '.1f'):>10} {fmt(row['prompt_tps'], '.1f'):>12} "
            f"{fmt(row['tokens_per_forward'], '.2f'):>8} {fmt(row['acceptance_length'], '.2f'):>7} "
            f"{row['peak_memory_gb']:>8.3f} {fmt(row['outside_forward_share'], '.1%'):>8} "
            f"{fmt(row['vs_mlx_lm'], '.2f'):>9} {identical_cell(row['identical_output']):>9} "
            f"{rounds_cell(row['rounds']):>16}"
        )
    return lines


def mismatch_lines(mismatches: List[dict]) -> List[str]:
    return [
        f"MISMATCH: {m['method']} differs from {m['reference']} at token {m['position']} "
        f"(prompt {m['prompt']}, repeat {m['repeat']}): a lossless mode must reproduce greedy AR"
        for m in mismatches
    ]


def json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=False)
