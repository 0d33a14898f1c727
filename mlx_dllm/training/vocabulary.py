"""`--loss-vocab seen`: the cross-entropy over only the tokens the training responses contain.

The target's LM head (frozen, shared with the drafter) is most of a training step for small targets: SmolLM2's
49,152 x 576 head costs 4x its drafter's two layers. Its responses use about 7,000 distinct tokens. The
softmax over those rows alone (EAGLE-3's draft-vocabulary idea, applied to the loss only) is exact for every
label, and inference keeps the full head, so the held-out acceptance measured at the end is the real one.
"""

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import DLLMError
from ..models.target import Target

LOSS_VOCABS = ("all", "seen")


def seen_tokens(examples: Sequence) -> np.ndarray:
    """Sorted ids of every token in a response (the only ones a label can be)."""
    return np.unique(np.concatenate([np.asarray(e.ids[e.response_start :], dtype=np.int32) for e in examples]))


def head_rows(target: Target, tokens: np.ndarray):
    """(weight [V', H] float32, bias [V'] or None): the LM head's rows for `tokens`, dequantized."""
    module = target.head_module
    index = mx.array(tokens)
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        biases = module.biases[index] if getattr(module, "biases", None) is not None else None
        weight = mx.dequantize(module.weight[index], module.scales[index], biases, module.group_size, module.bits,
                               mode=getattr(module, "mode", "affine"))
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        weight = module.weight[index]
    else:
        raise DLLMError(f"--loss-vocab seen: the target's head is a {type(module).__name__}; use --loss-vocab all")
    bias = module.bias[index].astype(mx.float32) if "bias" in module else None
    return weight.astype(mx.float32), bias


class SeenVocabHead:
    """Logits over the seen tokens, and labels renumbered to match."""

    def __init__(self, target: Target, tokens: np.ndarray):
        self.weight, self.bias = head_rows(target, tokens)
        self.position = np.full(int(tokens.max()) + 1, -1, dtype=np.int32)
        self.position[tokens] = np.arange(len(tokens), dtype=np.int32)
        mx.eval(self.weight)

    def __call__(self, hidden: mx.array) -> mx.array:
        logits = hidden @ self.weight.T
        return logits if self.bias is None else logits + self.bias

    def labels(self, labels: np.ndarray) -> np.ndarray:
        return self.position[labels]
