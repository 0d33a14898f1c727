"""DFlash2's selector term, as NeMo Automodel's DFlash2 trainer defines it (`dflash2_core`):

    loss = block loss + selector_loss_weight * selector loss

The block loss makes each position's candidate list good; the selector loss trains the choice among them. At
inference the walk scores each position's `selector_top_k` candidates (the top of its draft logits) after the token
it chose before; in training every earlier choice is taken to be right, so each position is scored after its true
predecessor (the anchor for position 1, the true token k-1 for position k), all positions at once.
"""

from typing import Callable

import mlx.core as mx

from .objective import Objective, weighted_blocks


def selector_loss(
    selector,
    objective: Objective,
    hidden: mx.array,
    logits: mx.array,
    labels: mx.array,
    predecessors: mx.array,
    token_ids: Callable[[mx.array], mx.array],
    weights: mx.array,
    valid: mx.array,
):
    """(the sum over blocks of the selector's loss, candidate hits [J, P]) for block positions 1..P.

    `selector` is a DFlash2 `CandidateSelector`; hidden [J, P, H] and logits [J, P, V] are the drafter's, over the
    rows it drafts from; labels [J, P] the true tokens as indices of those rows, predecessors [J, P] the true token
    ids before them, `token_ids` maps row indices to token ids (the codebooks' rows); weights [J, P] are the block
    loss's position weights and valid [J, P] marks positions with a label.

    Each position's loss is the cross-entropy, over its candidates' scores (unary logit + the selector's pair term,
    as the walk scores them), of the true token's index among them. Positions whose true token is not a candidate
    (or that have no label) have nothing to select and are left out; a hit [J, P] marks the others. Each block is
    normalised as the block loss normalises it, by its weights over the positions left in.
    """
    candidates = mx.stop_gradient(selector.candidates(logits))  # [J, P, K]: a choice, not differentiated
    unary = mx.take_along_axis(logits, candidates, axis=-1)
    scores = unary + selector.pair_scores(selector.hidden_projection(hidden), predecessors,
                                          token_ids(candidates))
    matches = (candidates == labels[..., None]) & valid.astype(mx.bool_)[..., None]
    hits = matches.any(axis=-1)
    index = mx.argmax(matches.astype(mx.int32), axis=-1)
    chosen = mx.take_along_axis(scores, index[..., None], axis=-1)[..., 0]
    losses = mx.logsumexp(scores, axis=-1) - chosen
    return weighted_blocks(objective, losses, weights * hits), hits
