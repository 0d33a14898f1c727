"""What a speculative-decoding strategy asks of a drafter that reads a target's hidden states.

A second drafter architecture is a new model file whose `Model` has these members; the strategies, the loader
and the CLI read nothing else of it.
"""

from typing import List, Optional, Protocol, Sequence, runtime_checkable

import mlx.core as mx


@runtime_checkable
class Drafter(Protocol):
    block_size: int  # the block it was trained to propose: anchor + block_size - 1 guesses
    mask_token_id: int  # the id that fills a block's unknown positions (a row of the target's embeddings)
    target_layer_ids: Sequence[int]  # the target layers whose outputs it reads, concatenated
    hidden_size: int  # the width of each of those outputs
    draft_vocab: Optional[Sequence[int]]  # head rows it proposes from (sorted ids), None: the whole head

    def __call__(self, block_embeddings: mx.array, target_features: mx.array, cache, start: int = 0) -> mx.array:
        """Hidden states for block positions `start..`, given the block's embeddings and the target features
        of the context rows the cache has not seen yet."""

    def make_cache(self) -> List:
        """A fresh per-layer cache of context rows (trimmed by the drafter itself: it keeps no block rows)."""

    def logits(self, head_logits: mx.array) -> mx.array:
        """Its logits, given the target head's output on its hidden states."""


def is_drafter(model) -> bool:
    return isinstance(model, Drafter)


def chooses_chain(model) -> bool:
    """Whether the drafter chooses its block's chain itself, by a method beyond the interface above:

        propose(hidden [P, H], anchor: int, head, sampling=None[, logits=...]) -> token ids [P]

    given the hidden states of positions 1..P and the anchor; `head.logits(hidden)` gives its logits over the tokens
    it drafts from (a batch passes them as `logits`, from one head forward over every row) and
    `head.token_ids(indices)` their ids. DFlash2's candidate selector is one: its chain is a walk
    that reads each chosen token, not the argmax at each position (which a drafter without `propose` proposes).
    With a `sampling` configuration (sampler.common.Sampling) it draws its chain instead and returns (token ids [P],
    the probability each was drawn with [P], each position's proposal distribution q [P, S], the token ids of q's
    columns [P, S]), for the chain's ratio test (sampler/dflash.py)."""
    return callable(getattr(model, "propose", None))


def grows_lattice(model) -> bool:
    """Whether the drafter scores its candidates given the candidate before them, for trees:

        lattice(hidden [P, H], anchor: int, head, width: int) -> (candidate ids [P, K], ranked [P, K, W], log-probs
        [P, K, W])

    position p's candidates ranked under each candidate of position p - 1 (under the anchor at p = 0), with their
    log-probabilities given it (sampler/tree.py `Lattice`). Without it, trees come from the drafter's top tokens at
    each position, scored independently."""
    return callable(getattr(model, "lattice", None))
