"""A decoding mode, declared once (`MODE` at the end of its strategy file), and the modes a model runs.

From the declarations come the front's checks, the CLI's flags, the server's fields and the benchmark's methods,
lossless checks and roofline; a new mode is a new strategy file and a name in its model's `modes`.
"""

import importlib
import math
import numbers
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import DLLMError

# What an mlx-lm target runs (public name -> strategy file): its own AR, and DFlash with a drafter.
TARGET_MODES = {"ar": "ar", "dflash": "dflash"}


@dataclass(frozen=True)
class Option:
    """A keyword a mode takes beyond the common ones; its type and range are checked here, once."""

    name: str
    kind: type  # int, float, bool or str (a CLI flag and a server field); callable or object: the API only
    help: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    above_minimum: bool = False  # the minimum itself is out of range
    label: Optional[str] = None  # how messages name it, where not by its keyword
    public: bool = True  # False: Python callers only (hooks, and values the front derives itself)
    flag: Optional[str] = None  # the CLI flag that sets it, where not derived from its name
    nullable: bool = False  # None is a value of its own (else None means: the default)
    choices: Tuple[str, ...] = ()  # a str option's values

    @property
    def served(self) -> bool:
        """Whether the CLI and the server take it: a public plain value."""
        return self.public and self.kind in (int, float, bool, str)

    @property
    def cli_flag(self) -> str:
        """`--no-lora` for an on-by-default switch, `--block-length` for a value."""
        dashed = self.name.replace("_", "-")
        return self.flag or (f"--no-{dashed}" if self.kind is bool else f"--{dashed}")

    def check(self, value):
        """The value, or one DLLMError line that names the option and what it must be."""
        label = self.label or self.name
        if self.kind is bool:
            if not isinstance(value, bool):
                raise DLLMError(f"{label} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if value not in self.choices:
                raise DLLMError(f"{label} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind is callable:
            if not callable(value):
                raise DLLMError(f"{label} must be callable, got {type(value).__name__}")
            return value
        if self.kind not in (int, float):
            return value
        integer = self.kind is int
        number = not isinstance(value, bool) and isinstance(value, numbers.Integral if integer else numbers.Real)
        if not number or not math.isfinite(value):
            raise DLLMError(f"{label} must be {'an integer' if integer else 'a finite number'}, got {value!r}")
        low, high = self.minimum, self.maximum
        if (low is not None and (value < low or (self.above_minimum and value == low))) or (
            high is not None and value > high
        ):
            raise DLLMError(f"{label} must be {self._range()}, got {value}")
        return int(value) if integer else float(value)

    def _range(self) -> str:
        low, high = self.minimum, self.maximum
        if high is not None:
            return f"a number in [{low}, {high}]" if self.kind is float else f"between {low} and {high}"
        return f"> {low}" if self.above_minimum else f"at least {low}"


@dataclass(frozen=True)
class Mode:
    """What the front, the CLI, the server and the benchmark know of a decoding mode."""

    name: str  # as users spell it (`--mode`, the server's `mode`, the benchmark's methods)
    run: Callable[..., Iterator[List[int]]]  # the strategy: yields the tokens each step commits
    lossless: bool  # greedy output equals greedy AR, token for token (the benchmark checks it on every run)
    samples: bool  # temp/top_p/top_k/min_p choose its tokens
    honours_sampler: bool  # its tokens come from AR logits: mlx-lm's sampler= and logits_processors apply
    step_forwards: Callable  # (model, draft, block) -> [(module, tokens)] of one decoding step, for the roofline
    options: Tuple[Option, ...] = ()
    drafter: bool = False  # needs a separate draft model
    reports: Tuple[str, ...] = ()  # GenerationResponse stats it fills beyond the common ones

    def check_options(self, given: Dict) -> Dict:
        """The given options (None: the default) checked by their declarations; another mode's are refused."""
        own = {option.name: option for option in self.options}
        checked = {}
        for name, value in sorted(given.items()):
            if name not in own:
                raise DLLMError(f"unknown option {name} for mode {self.name}{_whose(name)}")
            if value is not None:
                checked[name] = own[name].check(value)
            elif own[name].nullable:
                checked[name] = None
        return checked


def _whose(name: str) -> str:
    """Where an option another mode takes belongs, for the message that refuses it."""
    option = next((o for mode in all_modes() for o in mode.options if o.name == name), None)
    if option is None:
        return ""
    called = f"{name}, {option.cli_flag}," if option.public or option.flag else name
    return f" ({called} is for {' and '.join(takers(option))})"


def declaration(file: str) -> Mode:
    """The mode declared in `sampler/<file>.py`."""
    return importlib.import_module(f"{__package__}.{file}").MODE


def modes_of(model) -> Dict[str, Mode]:
    """The modes `model` runs, by name: its own `modes` (name -> strategy file), else an mlx-lm target's."""
    return {name: declaration(file) for name, file in getattr(model, "modes", TARGET_MODES).items()}


@lru_cache(maxsize=None)
def all_modes() -> Tuple[Mode, ...]:
    """Every declared mode: each strategy file of this package that ends with a MODE."""
    package = importlib.import_module(__package__)
    files = [info.name for info in pkgutil.iter_modules(package.__path__)]
    modules = [importlib.import_module(f"{__package__}.{file}") for file in sorted(files)]
    return tuple(module.MODE for module in modules if isinstance(getattr(module, "MODE", None), Mode))


def served_options() -> List[Option]:
    """The options the CLI and the server take, one per name, in declaration order."""
    found = {}
    for mode in all_modes():
        for option in mode.options:
            if option.served:
                found.setdefault(option.name, option)
    return list(found.values())


def takers(option: Option) -> List[str]:
    """The names of the modes that take `option`, for help texts and messages."""
    return list(dict.fromkeys(m.name for m in all_modes() if any(o.name == option.name for o in m.options)))
