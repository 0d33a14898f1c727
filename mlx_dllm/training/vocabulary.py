"""`--loss-vocab seen`: the cross-entropy over only the tokens the training responses contain.

The target's LM head (frozen, shared with the drafter) is most of a training step for small targets: SmolLM2's
49,152 x 576 head costs 4x its drafter's two layers. Its responses use about 7,000 distinct tokens. The
softmax over those rows alone (EAGLE-3's draft vocabulary) is exact for every
label. The drafter then proposes only those tokens at inference too (`draft_vocab` in its config), drafting
with those rows alone, so what it was trained on and what it is asked are the same.
"""

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..models.target import Target

LOSS_VOCABS = ("all", "seen")


def seen_tokens(examples: Sequence) -> np.ndarray:
    """Sorted ids of every token in a response (the only ones a label can be)."""
    return np.unique(np.concatenate([np.asarray(e.ids[e.response_start :], dtype=np.int32) for e in examples]))


class SeenVocabHead:
    """Logits over the seen tokens, labels renumbered to match, and the token ids of rows (DFlash2's codebooks)."""

    def __init__(self, target: Target, tokens: np.ndarray):
        weight, bias = target.head_rows(tokens.tolist())
        self.weight = weight.astype(mx.float32)
        self.bias = None if bias is None else bias.astype(mx.float32)
        self.ids = mx.array(tokens, dtype=mx.int32)
        self.position = np.full(int(tokens.max()) + 1, -1, dtype=np.int32)
        self.position[tokens] = np.arange(len(tokens), dtype=np.int32)
        mx.eval(self.weight)

    def __call__(self, hidden: mx.array) -> mx.array:
        logits = hidden @ self.weight.T
        return logits if self.bias is None else logits + self.bias

    def labels(self, labels: np.ndarray) -> np.ndarray:
        return self.position[labels]

    def token_ids(self, indices: mx.array) -> mx.array:
        return self.ids[indices]
