"""`--visualize`: redraw the diffusion canvas in the terminal at every denoising step."""

import shutil
import sys

from mlx_dllm.output import writing_output
from mlx_dllm.sampler.diffusion import StepState

NOISE, ACCEPTED, RESET = "\x1b[2m", "\x1b[1;32m", "\x1b[0m"  # dim noise, bold green accepted tokens
SAVE, RESTORE, ERASE_BELOW = "\x1b7", "\x1b8", "\x1b[J"


class CanvasView:
    """Draws the in-flight canvas below the committed text and erases it before anything else is printed."""

    def __init__(self, tokenizer, stream=None):
        self.tokenizer = tokenizer
        self.stream = stream or sys.stdout
        self.drawn = False
        self.column = 0  # where the committed text ends on its line

    def committed(self, text: str) -> None:
        """Track the cursor column of the committed text (the newlines below reset it to 0)."""
        width = max(shutil.get_terminal_size().columns, 1)
        self.column = (len(text.rsplit("\n", 1)[-1]) if "\n" in text else self.column + len(text)) % width

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token]).replace("\n", "\u23ce") or "\u00b7"

    def __call__(self, state: StepState) -> None:
        self.clear()
        pieces = [self._piece(token) for token in state.canvas]
        entropy = "" if state.mean_entropy is None else f", mean entropy {state.mean_entropy:.3f}"
        header = f"[canvas {state.canvas_index + 1} step {state.step + 1}{entropy}] "
        rows = (len(header) + sum(map(len, pieces))) // max(shutil.get_terminal_size().columns, 1) + 1
        painted = "".join(
            f"{ACCEPTED if accepted else NOISE}{piece}{RESET}" for piece, accepted in zip(pieces, state.accepted)
        )
        # Scroll first (newlines, then back up and over) so the saved cursor stays valid while drawing below it.
        back = f"\x1b[{rows}A" + (f"\x1b[{self.column}C" if self.column else "")
        with writing_output():
            self.stream.write("\n" * rows + back + SAVE + "\n" + header + painted)
            self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            with writing_output():
                self.stream.write(RESTORE + ERASE_BELOW)
                self.stream.flush()
            self.drawn = False
