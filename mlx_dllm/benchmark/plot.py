"""`--plot FILE.png`: tokens/s per method beside the histogram of tokens committed per step."""

from collections import Counter
from pathlib import Path
from typing import Dict, List

from ..errors import DLLMError
from .runner import MLX_LM, Sample, split_method


def pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise DLLMError("--plot needs matplotlib: pip install 'mlx-dllm[bench]'") from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise DLLMError(f"--plot writes a PNG: give a file name ending in .png, got {path.name}")
    if not path.parent.is_dir():
        raise DLLMError(f"--plot {path}: the folder {path.parent} does not exist")
    pyplot()


def speed_panel(axis, table: Dict[str, dict]) -> None:
    methods = list(table)
    speeds = [table[m]["generation_tps"] or 0 for m in methods]
    colors = [
        "#9e9e9e" if m == MLX_LM else ("#d62728" if table[m]["identical_output"] is False else "#1f77b4")
        for m in methods
    ]
    bars = axis.barh(methods, speeds, color=colors)
    for bar, method in zip(bars, methods):
        ratio = table[method]["vs_mlx_lm"]
        label = f" {bar.get_width():.1f}" + (f"  ({ratio:.2f}x mlx-lm)" if ratio is not None else "")
        if table[method]["identical_output"] is False:
            label += "  OUTPUT MISMATCH"
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=9)
    axis.invert_yaxis()
    axis.set_xlabel("generation tokens/s (median)")
    axis.set_title("Speed")
    axis.set_xlim(0, max(speeds + [1]) * 1.45)


def acceptance_panel(axis, samples: Dict[str, List[Sample]], block: int) -> None:
    # Speculative modes only: a diffusion chunk is a whole block, not what one verify accepted.
    methods = [m for m, runs in samples.items() if any(s.acceptance_length is not None for s in runs)]
    width = 0.8 / max(len(methods), 1)
    largest = max(block, 2)
    for index, method in enumerate(methods):
        counts = Counter(step for s in samples[method] for step in s.step_tokens)
        total = sum(counts.values()) or 1
        sizes = sorted(counts)
        largest = max([largest] + sizes)
        offsets = [size - 0.4 + width * (index + 0.5) for size in sizes]
        axis.bar(offsets, [counts[s] / total for s in sizes], width=width, label=method)
    axis.set_xticks(range(1, largest + 1))
    axis.set_xlim(0.5, largest + 0.5)  # the whole range up to the block size, so one bar reads as short
    axis.set_xlabel("tokens committed per verify step")
    axis.set_ylabel("share of steps")
    axis.set_title("Acceptance length")
    if methods:
        axis.legend()
    else:
        axis.text(0.5, 0.5, "no speculative mode", ha="center", va="center", transform=axis.transAxes)


def budgets(table: Dict[str, dict]) -> Dict[str, List[tuple]]:
    """DFlash methods with a pinned shape, by shape: (drafted tokens verified per round, method), ascending."""
    found = {"chain": [], "tree": []}
    for method in table:
        name, options = split_method(method)
        shape = options.get("speculation")
        if name == "dflash" and shape == "chain" and "block_size" in options:
            found[shape].append((int(options["block_size"]) - 1, method))
        elif name == "dflash" and shape == "tree" and "tree_budget" in options:
            found[shape].append((int(options["tree_budget"]), method))
    return {shape: sorted(points) for shape, points in found.items() if points}


def budget_panel(axis, table: Dict[str, dict], shapes: Dict[str, List[tuple]]) -> None:
    """Speed (vs mlx-lm, else tokens/s) and acceptance against the drafted tokens a round verifies; auto as a line."""
    ratio = any(row["vs_mlx_lm"] is not None for row in table.values())
    speed_key, speed_label = ("vs_mlx_lm", "speed vs mlx-lm") if ratio else ("generation_tps", "tokens/s")
    accept_axis = axis.twinx()
    for (shape, points), color in zip(shapes.items(), ("#1f77b4", "#ff7f0e")):
        x = [budget for budget, _ in points]
        axis.plot(x, [table[m][speed_key] or 0 for _, m in points], "o-", color=color, label=f"{shape} speed")
        accept_axis.plot(x, [table[m]["acceptance_length"] or 0 for _, m in points], "s--", color=color,
                         alpha=0.6, label=f"{shape} acceptance")
    auto = [m for m in table if split_method(m) == ("dflash", {"speculation": "auto"})]
    if auto and table[auto[0]][speed_key] is not None:
        axis.axhline(table[auto[0]][speed_key], color="#2ca02c", linestyle=":", label="auto speed")
    if ratio:
        axis.axhline(1.0, color="#9e9e9e", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("drafted tokens verified per round (chain: block - 1; tree: budget)")
    axis.set_ylabel(speed_label)
    accept_axis.set_ylabel("acceptance length")
    axis.set_title("Speed and acceptance against budget")
    lines, labels = axis.get_legend_handles_labels()
    more, more_labels = accept_axis.get_legend_handles_labels()
    axis.legend(lines + more, labels + more_labels, fontsize=8)


def write_plot(path: Path, table: Dict[str, dict], samples: Dict[str, List[Sample]], title: str, block: int) -> None:
    """Two panels, and a third for DFlash's pinned chains and trees; `block` is the most tokens one verify step can
    commit (the x-axis of the histogram)."""
    plt = pyplot()
    shapes = budgets(table)
    figure, axes = plt.subplots(1, 3 if shapes else 2, figsize=(18 if shapes else 12, 4.5))
    speed_panel(axes[0], table)
    acceptance_panel(axes[1], samples, block)
    if shapes:
        budget_panel(axes[2], table, shapes)
    figure.suptitle(title)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.partial")
    figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    temporary.replace(path)  # atomic: a failed run leaves no half-written picture
