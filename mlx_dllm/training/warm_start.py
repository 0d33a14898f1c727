"""`--init FOLDER`: start from an existing DFlash or DFlash2 drafter instead of from scratch.

This is how a published drafter is adapted to a fine-tuned target, or an earlier run is trained further on new
data. The new drafter keeps the old one's architecture (its config: layers, attention layout, target layers,
mask token, and a DFlash2 drafter's convolution and selector fields) and starts from its weights, as float32 master
weights (a quantized folder is dequantized). A DFlash drafter may also start a DFlash2 one (`--arch dflash2`). The
drafter shares the target's embedding and head, so it must have been built for a target of the same width and
vocabulary.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import DLLMError
from ..models import dflash2

QUANTIZATION_KEYS = ("quantization", "quantization_config")


@dataclass(frozen=True)
class InitialDrafter:
    config: Dict  # the folder's config.json
    args: object  # the drafter's parsed ModelArgs
    weights: List[Tuple[str, mx.array]]

    @property
    def arch(self) -> str:
        return "dflash2" if dflash2.FAMILY.built_as(self.config) else "dflash"

    def draft_config(self, block_size: int, draft_vocab: Optional[List[int]]) -> Dict:
        """The new drafter's config: the old one's, with this run's block size and draft vocabulary."""
        config = {key: value for key, value in self.config.items() if key not in QUANTIZATION_KEYS}
        dflash = {**(config.get("dflash_config") or {}), "target_layer_ids": list(self.args.target_layer_ids),
                  "mask_token_id": self.args.mask_token_id, "block_size": block_size}
        dflash.pop("draft_vocab", None)
        if draft_vocab is not None:
            dflash["draft_vocab"] = list(draft_vocab)
        config.pop("draft_vocab", None)
        return {**config, "block_size": block_size, "dflash_config": dflash}

    def draft_vocab(self, seen: Optional[List[int]]) -> Optional[List[int]]:
        """What the new drafter may propose: the tokens it saw now and those it could propose before (None: all)."""
        if seen is None:
            return None
        return sorted(set(seen) | set(self.args.draft_vocab or ()))


def read_initial_drafter(folder: str, target_args) -> InitialDrafter:
    from mlx_lm.utils import dequantize_model

    from .. import loading

    path = loading.resolve(folder)
    config = loading.read_config(path)
    if not loading.is_dflash_config(config):
        raise DLLMError(f"--init {folder} is not a DFlash drafter (give target, random or a drafter folder)")
    draft, _ = loading.load(str(path))  # a DFlash config always builds our drafter
    theirs = {"hidden size": draft.args.hidden_size, "vocabulary": config.get("vocab_size", target_args.vocab_size)}
    ours = {"hidden size": target_args.hidden_size, "vocabulary": target_args.vocab_size}
    for what, value in theirs.items():
        if value != ours[what]:
            raise DLLMError(f"--init {folder} was built for another target: its {what} is {value}, "
                            f"the target's is {ours[what]}")
    dequantize_model(draft)  # a no-op when it is not quantized
    weights = [(name, value.astype(mx.float32)) for name, value in tree_flatten(draft.parameters())]
    return InitialDrafter(config, draft.args, weights)


def adopt_architecture(config, initial: InitialDrafter) -> None:
    """This run's layers, target layers and mask token (and a DFlash2 drafter's fields) are the drafter's: options
    may repeat them, not change them. The block size is free (the weights do not depend on it) and defaults to the
    drafter's."""
    args = initial.args
    fixed = [("--num-layers", "num_layers", args.num_hidden_layers),
             ("--target-layers", "target_layers", list(args.target_layer_ids)),
             ("--mask-token-id", "mask_token_id", args.mask_token_id)]
    if initial.arch == "dflash2":
        fixed += [("--" + name.replace("_", "-"), name, getattr(args, name)) for name in dflash2.FIELDS]
    for option, name, theirs in fixed:
        ours = getattr(config, name)
        if ours is not None and ours != theirs:
            raise DLLMError(f"{option} {ours} differs from the --init drafter's {theirs}; leave it out")
        setattr(config, name, theirs)
    config.block_size = config.block_size or args.block_size
