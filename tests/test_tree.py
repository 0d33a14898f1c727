"""Draft trees (issue 23, first step): best-first growth from per-depth distributions, the path the target follows,
and the tree as an attention pattern, against brute force."""

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from mlx_dllm import DLLMError
from mlx_dllm.kernels import attention, metal, patterns, routing
from mlx_dllm.models.cache import WindowKVCache
from mlx_dllm.models.positioned import layer_tree
from mlx_dllm.models.target import Target
from mlx_dllm.sampler.tree import DraftTree, Lattice, follow, grow, grow_tree
from tests.test_target_families import FAMILIES, LAYERS, RECURRENT_FAMILIES, VOCAB, make_target

# Three depths, three candidates each, most probable first.
TOKENS = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]
PROBS = [[0.6, 0.3, 0.1], [0.9, 0.05, 0.05], [0.5, 0.4, 0.1]]
LOG_PROBS = [[math.log(p) for p in row] for row in PROBS]


def brute_force_tree(budget):
    """Every prefix (a choice of rank per depth, for the first d depths), scored; the `budget` best."""
    prefixes = []
    for depth in range(1, len(TOKENS) + 1):
        for ranks in itertools.product(range(3), repeat=depth):
            score = sum(LOG_PROBS[d][r] for d, r in enumerate(ranks))
            prefixes.append((score, tuple(TOKENS[d][r] for d, r in enumerate(ranks))))
    return sorted(prefixes, key=lambda item: -item[0])[:budget]


def paths(tree: DraftTree):
    """Each node's token path from the anchor (exclusive)."""
    found = []
    for row in range(1, len(tree)):
        path, node = [], row
        while node > 0:
            path.append(tree.tokens[node])
            node = tree.parents[node]
        found.append(tuple(reversed(path)))
    return found


@pytest.mark.parametrize("budget", [0, 1, 2, 5, 8, 13, 39, 100])
def test_the_tree_holds_the_best_prefixes_best_first_and_parents_first(budget):
    tree = grow_tree(7, TOKENS, LOG_PROBS, budget)
    assert tree.tokens[0] == 7 and tree.parents[0] == -1 and tree.depths[0] == 0
    expected = brute_force_tree(budget)
    assert len(tree) - 1 == len(expected) == min(budget, 39)  # 3 + 9 + 27 prefixes in all
    assert sorted(paths(tree)) == sorted(path for _, path in expected)
    scores = [sum(LOG_PROBS[d][TOKENS[d].index(t)] for d, t in enumerate(p)) for p in paths(tree)]
    assert scores == sorted(scores, reverse=True)  # popped best first
    assert all(0 <= tree.parents[row] < row for row in range(1, len(tree)))
    assert all(tree.depths[row] == tree.depths[tree.parents[row]] + 1 for row in range(1, len(tree)))


def test_a_budget_of_the_block_is_the_chain_when_the_drafter_is_sure():
    sure = [[math.log(0.99), math.log(0.01)]] * 3
    tree = grow_tree(1, [[5, 6], [7, 8], [9, 4]], sure, 3)
    assert tree == DraftTree((1, 5, 7, 9), (-1, 0, 1, 2), (0, 1, 2, 3))


def random_lattice(depths: int, width: int, seed: int) -> Lattice:
    """A DFlash2-like lattice: each depth's candidates scored anew under each candidate of the depth before."""
    rng = np.random.default_rng(seed)
    tokens = [[100 * d + i for i in range(width)] for d in range(depths)]
    ranked, log_probs = [], []
    for d in range(depths):
        rows = 1 if d == 0 else width
        scores = rng.normal(size=(rows, width)) * 2
        logs = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
        order = np.argsort(-logs, axis=1)
        ranked.append(order.tolist())
        log_probs.append(np.take_along_axis(logs, order, axis=1).tolist())
    return Lattice(tokens, ranked, log_probs)


@pytest.mark.parametrize("budget", [1, 4, 9, 20, 63])
def test_a_lattice_tree_holds_the_best_paths_scored_given_each_parent(budget):
    lattice = random_lattice(depths=3, width=3, seed=budget)

    def score(choices):
        total, parent = 0.0, 0
        for depth, choice in enumerate(choices):
            total += lattice.log_prob(depth, parent, choice)
            parent = choice
        return total

    every = [choices for depth in range(1, 4) for choices in itertools.product(range(3), repeat=depth)]
    best = sorted(every, key=lambda c: -score(c))[:budget]
    grown = grow(5, lattice, budget)
    tree = grown.tree
    found = [tuple(tree.lineage(row)) for row in range(1, len(tree))]
    assert sorted(found) == sorted(tuple(100 * d + c for d, c in enumerate(choices)) for choices in best)
    assert grown.scores[1:] == pytest.approx([score([t % 100 for t in path]) for path in found])
    assert list(grown.scores[1:]) == sorted(grown.scores[1:], reverse=True)
    assert all(0 <= tree.parents[row] < row for row in range(1, len(tree)))


def test_bad_growth_input_is_one_line():
    with pytest.raises(DLLMError, match="budget must be at least 0"):
        grow_tree(1, TOKENS, LOG_PROBS, -1)
    with pytest.raises(DLLMError, match="same shape"):
        grow_tree(1, TOKENS, LOG_PROBS[:2], 4)


def test_the_target_follows_the_longest_matching_path_and_adds_its_bonus():
    tree = grow_tree(7, TOKENS, LOG_PROBS, 8)
    row = {path: k + 1 for k, path in enumerate(paths(tree))}
    choices = [99] * len(tree)
    assert follow(tree, choices) == ([], 99)  # the first draft rejected: the bonus is the target's own token
    choices[0], choices[row[(11,)]] = 11, 20  # the second-ranked first token, then the top second one
    choices[row[(11, 20)]] = 77
    assert follow(tree, choices) == ([row[(11,)], row[(11, 20)]], 77)
    choices[0], choices[row[(10,)]], choices[row[(10, 20)]], choices[row[(10, 20, 30)]] = 10, 20, 30, 5
    assert follow(tree, choices) == ([row[(10,)], row[(10, 20)], row[(10, 20, 30)]], 5)


def brute_force_visible(prefix, parents, window=0):
    """By positions: the anchor at `prefix`, a node at its parent's + 1, prefix key j at j."""
    n = len(parents)
    position = []
    for parent in parents:
        position.append(prefix if parent < 0 else position[parent] + 1)
    seen = np.zeros((n, prefix + n), dtype=bool)
    for row in range(n):
        for key in range(prefix):
            seen[row, key] = not window or position[row] - key < window
        node = row
        while node >= 0:
            seen[row, prefix + node] = not window or position[row] - position[node] < window
            node = parents[node]
    return seen


@pytest.mark.parametrize("prefix, window", [(0, 0), (5, 0), (5, 1), (5, 2), (5, 4), (9, 3), (0, 2)])
def test_the_tree_pattern_sees_the_prefix_the_ancestors_and_itself(prefix, window):
    tree = grow_tree(7, TOKENS, LOG_PROBS, 13)
    pattern = patterns.tree(prefix, tree.parents, window)
    n = len(tree)
    expected = brute_force_visible(prefix, tree.parents, window)
    assert window == 0 or not expected.all()  # the window cuts something
    np.testing.assert_array_equal(np.array(patterns.visible(pattern, n, prefix + n)), expected)
    np.testing.assert_array_equal(np.array(patterns.mask(pattern, n, prefix + n)), expected)


def test_tree_attention_equals_each_path_attended_alone():
    """Every row of one tree forward equals the causal attention over its own path: what the verify relies on."""
    tree = grow_tree(7, TOKENS, LOG_PROBS, 9)
    prefix, n, dim = 4, len(tree), 8
    rng = np.random.default_rng(0)
    q, k, v = (
        mx.array(rng.standard_normal((1, 2, length, dim)).astype(np.float32)) for length in (n, prefix + n, prefix + n)
    )
    out = attention(q, k, v, dim**-0.5, patterns.tree(prefix, tree.parents))
    for row in range(n):
        lineage, node = [], row
        while node >= 0:
            lineage.insert(0, node)
            node = tree.parents[node]
        keys = list(range(prefix)) + [prefix + node for node in lineage]
        alone = mx.fast.scaled_dot_product_attention(
            q[:, :, row : row + 1], k[:, :, keys], v[:, :, keys], scale=dim**-0.5
        )
        np.testing.assert_allclose(np.array(out[:, :, row]), np.array(alone[:, :, 0]), atol=1e-5)


def test_a_tree_verify_routes_to_the_metal_kernel_where_it_runs():
    verify = patterns.tree(48, [-1] + list(range(15)))
    assert routing.route(routing.Call("metal", 16, 64, 128, 4, mx.float16, verify)) == routing.KERNEL
    assert routing.route(routing.Call("metal", 16, 64, 64, 1, mx.float32, verify)) == routing.KERNEL
    assert routing.route(routing.Call("cpu", 16, 64, 128, 4, mx.float16, verify)) == routing.SDPA
    assert routing.route(routing.Call("metal", 16, 64, 96, 4, mx.float16, verify)) == routing.SDPA
    wide = patterns.tree(8, [-1] + [0] * 299)  # past the kernel's 256 queries
    assert routing.route(routing.Call("metal", 300, 308, 128, 4, mx.float16, wide)) == routing.SDPA


def test_tree_words_hold_the_ancestor_rows_as_bits():
    parents = [-1, 0, 1, -1] + [row - 1 if row % 3 else row // 2 for row in range(4, 40)]
    words = np.array(patterns.tree_words(parents), dtype="<u4").reshape(40, 2)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :40]
    np.testing.assert_array_equal(bits.astype(bool), np.array(patterns.ancestors(parents)))


def test_the_kernel_refuses_a_tree_of_other_shapes():
    q, k = mx.zeros((1, 1, 2, 64)), mx.zeros((1, 1, 4, 64))
    with pytest.raises(ValueError, match=r"2 rows after 3 keys is not a \[2, 4\]"):
        metal.block_attention(q, k, k, 1.0, patterns.tree(3, [-1, 0]))


def test_a_tree_refuses_a_parent_after_its_child():
    with pytest.raises(ValueError, match="earlier row"):
        patterns.tree(3, [-1, 2, 0])


def lineage(tree: DraftTree, row: int):
    rows = []
    while row >= 0:
        rows.insert(0, row)
        row = tree.parents[row]
    return rows


def test_each_cache_kind_sees_the_tree_through_its_own_keys_and_window():
    """A K/V layer's keys are all it holds; a sliding one's, the rows it kept. The window mlx-lm asks for wins."""
    plain, sliding = KVCache(), WindowKVCache(4)
    for layer in (plain, sliding):
        layer.update_and_fetch(mx.zeros((1, 1, 6, 2)), mx.zeros((1, 1, 6, 2)))
    parents = [-1, 0, 0, 1]
    tree = patterns.tree(6, parents)
    assert layer_tree(plain, tree, None) == tree
    assert layer_tree(plain, tree, 3) == patterns.tree(6, parents, 3)
    assert layer_tree(sliding, tree, None) == patterns.tree(3, parents, 4)
    assert layer_tree(sliding, tree, 2) == patterns.tree(3, parents, 2)


SLIDING = 3  # cuts the 5-token prompt and the deepest nodes' anchor off a sliding layer's view


def rows_read_next(layer):
    """The K/V rows a layer's next forward reads: all it holds, or the last window - 1 of a sliding window."""
    end = layer.size()
    start = end - min(end, layer.window - 1) if isinstance(layer, WindowKVCache) else 0
    return [getattr(layer, name)[..., start:end, :] for name in ("keys", "values")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_tree_verify_equals_each_path_run_causally_and_keeps_exactly_the_accepted_path(family):
    """One forward over [anchor, nodes] at per-node positions under the tree pattern: every row's logits and
    features are those of a causal run over its own path; keeping a path leaves the cache a fresh prefill's
    (within a sliding layer's window, where the window cuts both the prompt and the tree)."""
    sliding = "sliding_window" in FAMILIES[family]
    model = make_target(family, **({"sliding_window": SLIDING} if sliding else {}))
    target = Target(model, [0, LAYERS - 1])
    prompt = [5, 17, 42, 9, 3]
    tokens = [[t % VOCAB for t in row] for row in TOKENS]
    tree = grow_tree(11, tokens, LOG_PROBS, 9)
    cache = target.make_cache()
    assert sliding == any(isinstance(layer, WindowKVCache) for layer in cache)
    assert not sliding or max(tree.depths) >= SLIDING  # the window hides the anchor from the deepest nodes
    target(mx.array([prompt]), cache)
    cache.mark()
    positions = mx.array([len(prompt) + depth for depth in tree.depths])
    logits, features = target(mx.array([list(tree.tokens)]), cache, patterns.tree(len(prompt), tree.parents), positions)
    for row in range(len(tree)):
        text = prompt + [tree.tokens[k] for k in lineage(tree, row)]
        expected_logits, expected_features = target(mx.array([text]), target.make_cache())
        np.testing.assert_allclose(np.array(logits[0, row]), np.array(expected_logits[0, -1]), atol=1e-4)
        np.testing.assert_allclose(np.array(features[0, row]), np.array(expected_features[0, -1]), atol=1e-4)
    path = lineage(tree, len(tree) - 1)  # the anchor and a deepest node's ancestors
    cache.keep(path)
    fresh = target.make_cache()
    target(mx.array([prompt + [tree.tokens[k] for k in path]]), fresh)
    for ours, expected in zip(cache, fresh):
        assert ours.offset == expected.offset
        for ours_rows, expected_rows in zip(rows_read_next(ours), rows_read_next(expected)):
            assert ours_rows.shape == expected_rows.shape
            np.testing.assert_allclose(np.array(ours_rows), np.array(expected_rows), atol=1e-5)
    following = mx.array([[tokens[0][1]]])
    np.testing.assert_allclose(np.array(target(following, cache)[0]), np.array(target(following, fresh)[0]), atol=1e-4)


@pytest.mark.parametrize("family", list(RECURRENT_FAMILIES))
def test_a_tree_verify_is_refused_in_one_line_on_recurrent_targets(family):
    target = Target(make_target(family), [0])
    cache = target.make_cache()
    target(mx.array([[5, 17, 42]]), cache)
    refusal = r"a tree verify cannot run on this target's ArraysCache \(recurrent\) layers: each tree node would need"
    with pytest.raises(DLLMError, match=refusal):
        target(mx.array([[1, 2]]), cache, patterns.tree(3, [-1, 0]), mx.array([3, 4]))
