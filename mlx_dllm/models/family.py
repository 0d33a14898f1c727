"""A model family: the config.json it claims and the tiny checkpoint `mlx-dllm benchmark --tiny` builds of it.

Each model file of ours ends with `FAMILY = Family(...)`. The loader, the converter and the benchmark find the
families here, by listing this package, so a new family is a new model file and nothing else.
"""

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Dict, Optional, Tuple

# Every tiny checkpoint shares one word-level tokenizer over these ids (benchmark/tiny.py writes it).
TINY_VOCAB = 256
TINY_EOS_TOKEN_ID = 1
TINY_MASK_TOKEN_ID = TINY_VOCAB - 1  # an embedding row the tokenizer never produces


@dataclass(frozen=True)
class Tiny:
    """A tiny random checkpoint of a family: it checks plumbing in CI, not speed (random weights accept ~1 token)."""

    config: Dict[str, Any]  # the family's config.json
    target: Optional[Dict[str, Any]] = None  # a drafter's: the config.json of an mlx-lm target it drafts for
    lora: Optional[str] = None  # a PEFT LoRA drafter beside the weights, on this module of each layer ({}: index)


@dataclass(frozen=True)
class Family:
    name: str  # as `mlx-dllm benchmark --tiny` spells it
    architectures: Tuple[str, ...]  # config.json `architectures` entries it claims
    model_types: Tuple[str, ...] = ()  # config.json `model_type` values it claims
    config_key: Optional[str] = None  # a config.json key that alone says the config is this family's
    tiny: Optional[Tiny] = None

    def named_in(self, config: Dict) -> bool:
        """The config names this family by architecture or by its key."""
        return self.built_as(config) or self.keyed_in(config)

    def built_as(self, config: Dict) -> bool:
        return any(a in self.architectures for a in config.get("architectures") or [])

    def keyed_in(self, config: Dict) -> bool:
        return self.config_key is not None and self.config_key in config

    def typed_in(self, config: Dict) -> bool:
        return config.get("model_type") in self.model_types


@functools.lru_cache(maxsize=None)
def model_files() -> Tuple[ModuleType, ...]:
    """Every module of this package that declares a FAMILY, in file-name order (found by listing the package, not
    by a list kept here, so that adding a family edits no other file)."""
    package = importlib.import_module(__package__)
    modules = [importlib.import_module(f"{__package__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    return tuple(module for module in modules if isinstance(getattr(module, "FAMILY", None), Family))


def families() -> Tuple[Family, ...]:
    return tuple(module.FAMILY for module in model_files())


def model_file(config: Dict) -> Optional[ModuleType]:
    """Our model file for this config.json, or None when mlx-lm's AR classes serve it. An architecture wins over a
    family's key (a DFlash2 drafter carries v1's `dflash_config`), and either over a model_type, the weakest claim."""
    for claims in (Family.built_as, Family.keyed_in, Family.typed_in):
        for module in model_files():
            if claims(module.FAMILY, config):
                return module
    return None
