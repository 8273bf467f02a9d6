"""Tree verification: the tree holds the likeliest paths, each node attends exactly as its own path would, the walk
accepts what the target's argmax agrees with, and the accepted path's cache is the plain sequence's."""
import itertools

import pytest
import torch

from flexdraft.batch import Stats
from flexdraft.rng import Streams
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import Drafts, SpecConfig, tree_inputs, tree_step
from flexdraft.tree import DraftTree, build_tree, compact, greedy_choice, walk
from helpers import random_prompts, tiny_target


def random_candidates(B, W, K, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.stack([torch.stack([torch.randperm(50, generator=g)[:K] for _ in range(W)]) for _ in range(B)])
    probs = torch.rand(B, W, K, generator=g).sort(dim=-1, descending=True).values * 0.9 + 0.05
    return tokens, probs


def brute_force_paths(tokens, probs, max_depth):
    """Every path (tuple of candidate ranks) with its probability, for one row."""
    W, K = tokens.shape
    paths = {}
    for depth in range(1, min(W, max_depth) + 1):
        for ranks in itertools.product(range(K), repeat=depth):
            paths[ranks] = float(torch.tensor([probs[d, r] for d, r in enumerate(ranks)]).prod())
    return paths


def node_paths(tree, row):
    """Each node's path as a tuple of tokens from the root."""
    paths = {}
    for j in range(tree.num_nodes):
        if tree.valid[row, j]:
            parent = int(tree.parents[row, j])
            paths[j + 1] = (paths[parent] if parent else ()) + (int(tree.tokens[row, j]),)
    return paths


@pytest.mark.parametrize("B,W,K,max_nodes,threshold", [(3, 3, 4, 6, 0.0), (2, 4, 3, 11, 0.05), (1, 2, 5, 40, 0.0),
                                                       (4, 5, 2, 7, 0.2)])
def test_tree_holds_the_likeliest_paths(B, W, K, max_nodes, threshold):
    tokens, probs = random_candidates(B, W, K, seed=B * 10 + W)
    max_depth = torch.tensor([W, 1, 2, W][:B])
    tree = build_tree(tokens, probs, max_nodes, threshold, max_depth=max_depth)
    for row in range(B):
        paths = brute_force_paths(tokens[row], probs[row], int(max_depth[row]))
        ranked = sorted((p for p in paths.values() if p >= threshold), reverse=True)
        expected = {tuple(int(tokens[row, d, r]) for d, r in enumerate(ranks))
                    for ranks, p in paths.items() if p >= threshold and p >= ranked[min(max_nodes, len(ranked)) - 1]}
        got = node_paths(tree, row)
        assert len(got) == min(max_nodes, len(ranked))
        assert set(got.values()) <= expected           # every node is among the likeliest (ties at the edge aside)
        assert all(int(tree.parents[row, j - 1]) < j for j in got)                          # parents come first
        assert all(len(path) == int(tree.depth[row, j - 1]) <= max_depth[row] for j, path in got.items())


def test_a_certain_chain_is_kept_whole_and_ranks_first():
    tokens = torch.tensor([[[7, 1], [8, 2], [9, 3]]])
    probs = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    tree = build_tree(tokens, probs, max_nodes=5, threshold=0.01)
    assert tree.tokens.tolist() == [[7, 8, 9]] and tree.parents.tolist() == [[0, 1, 2]] and tree.valid.all()


def test_ancestors_follow_the_parents():
    tokens, probs = random_candidates(2, 3, 3, seed=4)
    tree = build_tree(tokens, probs, 9, 0.0)
    seen = tree.ancestors()
    for row in range(2):
        for j in range(1, tree.num_nodes + 1):
            chain, at = {0, j}, j
            while at:
                at = int(tree.parents[row, at - 1])
                chain.add(at)
            assert {i for i in range(tree.num_nodes + 1) if seen[row, j, i]} == chain
        assert seen[row, 0].tolist() == [True] + [False] * tree.num_nodes


def test_walk_accepts_the_path_the_target_agrees_with():
    # Root 0 -> slots 1 (token 5), 2 (token 6); slot 1 -> 3 (token 7), 4 (token 8); slot 4 -> 5 (token 9).
    tree = DraftTree(tokens=torch.tensor([[5, 6, 7, 8, 9]] * 2), parents=torch.tensor([[0, 0, 1, 1, 4]] * 2),
                     depth=torch.tensor([[1, 1, 2, 2, 3]] * 2), valid=torch.ones(2, 5, dtype=torch.bool))
    argmax = torch.tensor([[5, 8, 40, 41, 9, 42],      # root wants 5 (slot 1), slot 1 wants 8 (slot 4), slot 4 wants 9
                           [6, 1, 2, 3, 4, 5]])        # root wants 6 (slot 2), slot 2 wants 2: no child
    out, accept_len, path, new_len = walk(tree, greedy_choice(argmax), torch.tensor([10, 20]))
    assert accept_len.tolist() == [3, 1] and new_len.tolist() == [14, 22]
    assert out.tolist() == [[5, 8, 9, 42], [6, 2, -1, -1]]
    assert path.tolist() == [[1, 4, 5], [2, 0, 0]]
    tree.valid = torch.tensor([[True, True, True, False, True]] * 2)   # padding is never accepted
    assert walk(tree, greedy_choice(argmax), torch.tensor([10, 20]))[1].tolist() == [1, 1]


def test_walk_stops_drawing_once_no_row_walks():
    """A sampled choice costs a draw over the vocabulary: once every row has resolved its token, the walk asks no
    more, and its result is the one a walk through every depth gives."""
    tree = DraftTree(tokens=torch.tensor([[5, 6, 7, 8, 9]] * 2), parents=torch.tensor([[0, 0, 1, 1, 4]] * 2),
                     depth=torch.tensor([[1, 1, 2, 2, 3]] * 2), valid=torch.ones(2, 5, dtype=torch.bool))
    argmax = torch.tensor([[5, 1, 40, 41, 9, 42],      # root wants 5 (slot 1), slot 1 wants 1: no child
                           [3, 1, 2, 3, 4, 5]])        # root wants 3: no child
    asked = []
    choose = greedy_choice(argmax)
    out, accept_len, path, new_len = walk(tree, lambda at: asked.append(at.tolist()) or choose(at),
                                          torch.tensor([10, 20]))
    assert asked == [[0, 0], [1, 0]]
    assert accept_len.tolist() == [1, 0] and new_len.tolist() == [12, 21]
    assert out.tolist() == [[5, 1, -1, -1], [3, -1, -1, -1]] and path.tolist() == [[1, 0, 0], [0, 0, 0]]


def test_tree_attention_equals_each_path_run_alone():
    """Every node's logits equal those of its own path decoded as a plain sequence, in a ragged batch, and after
    compaction the accepted path's K/V are the plain sequence's."""
    model, _ = tiny_target("qwen3", seed=3)
    prompts = random_prompts(model.config.vocab_size, [5, 9], seed=2)
    tokens, probs = random_candidates(2, 3, 3, seed=8)
    tree = build_tree(tokens % model.config.vocab_size, probs, 8, 0.0)
    bonus = torch.tensor([11, 12])

    def prefilled():
        cache = model.new_cache(2, 32)
        lengths = torch.tensor([len(p) for p in prompts])
        for row, p in enumerate(prompts):      # rows one by one, so that each prompt is a plain sequence
            one = model.new_cache(1, 32)
            model(torch.tensor([p]), torch.arange(len(p))[None], one)
            cache.k[:, row], cache.v[:, row] = one.k[:, 0], one.v[:, 0]
        # Poison past each prompt (finite: a masked NaN would still poison the softmax's zero weights).
        cache.k[:, :, :, 9:], cache.v[:, :, :, 9:] = 1e3, -1e3
        cache.k[:, 0, :, 5:], cache.v[:, 0, :, 5:] = 1e3, -1e3
        cache.lengths = lengths
        return cache

    cache = prefilled()
    lengths = cache.lengths.clone()
    step, positions, slots = tree_inputs(cache, bonus, tree)
    hidden, _ = model(step, positions, cache, tree=slots)
    logits = model.logits(hidden)
    assert torch.isfinite(logits).all()
    paths = [node_paths(tree, row) for row in range(2)]
    for row in range(2):
        for j, path in [(0, ())] + list(paths[row].items()):
            seq = prompts[row] + [int(bonus[row])] + list(path)
            alone = model.logits(model(torch.tensor([seq]), torch.arange(len(seq))[None], model.new_cache(1, 32))[0])
            torch.testing.assert_close(logits[row, j], alone[0, -1], rtol=1e-5, atol=1e-5)

    # Accept the deepest path of each row; the compacted cache then holds that path where it stands.
    deepest = [max(paths[row], key=lambda j: len(paths[row][j])) for row in range(2)]
    argmax = logits.argmax(-1).clone()
    for row in range(2):
        at = deepest[row]
        while at:
            parent = int(tree.parents[row, at - 1])
            argmax[row, parent] = tree.tokens[row, at - 1]
            at = parent
    out, accept_len, path, new_len = walk(tree, greedy_choice(argmax), lengths)
    compact(cache, lengths, path, accept_len)
    for row in range(2):
        seq = prompts[row] + [int(bonus[row])] + list(paths[row][deepest[row]])
        assert int(accept_len[row]) == len(paths[row][deepest[row]]) and int(new_len[row]) == len(seq)
        alone = model.new_cache(1, 32)
        model(torch.tensor([seq]), torch.arange(len(seq))[None], alone)
        torch.testing.assert_close(cache.k[:, row, :, :len(seq)], alone.k[:, 0, :, :len(seq)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[:, row, :, :len(seq)], alone.v[:, 0, :, :len(seq)], rtol=1e-5, atol=1e-5)


def test_tree_step_accepts_a_second_choice_and_keeps_decoding_exact():
    """Drafts whose likeliest candidates are all wrong but whose second ones are the target's greedy tokens: a chain
    accepts nothing, the tree accepts them all, and the next token is the target's own."""
    model, _ = tiny_target("llama", seed=6)
    prompt = random_prompts(model.config.vocab_size, [7], seed=1)[0]
    full = model.new_cache(1, 40)
    seq = list(prompt)
    for _ in range(5):   # the target's greedy continuation
        logits = model.logits(model(torch.tensor([seq]), torch.arange(len(seq))[None], model.new_cache(1, 40))[0])
        seq.append(int(logits[0, -1].argmax()))
    bonus, truth = seq[len(prompt)], seq[len(prompt) + 1: len(prompt) + 4]
    wrong = [(t + 1) % model.config.vocab_size for t in truth]
    top = (torch.tensor([[[w, t] for w, t in zip(wrong, truth)]]), torch.tensor([[[0.6, 0.4]] * 3]))
    drafts = Drafts(top[0][..., 0], top[1][..., 0], None, top)
    model(torch.tensor([prompt]), torch.arange(len(prompt))[None], full)
    full.lengths = torch.tensor([len(prompt)])
    tree = build_tree(*top, max_nodes=14, threshold=0.0)
    out, accept_len, new_bonus, _ = tree_step(model, None, full, torch.tensor([bonus]), drafts, tree, SamplingParams(),
                                              SpecConfig(tree_nodes=14), Streams(torch.arange(1)), Stats())
    assert accept_len.tolist() == [3] and out.tolist() == [truth + [seq[len(prompt) + 4]]]
    assert full.lengths.tolist() == [len(prompt) + 4] and int(new_bonus) == seq[len(prompt) + 4]
    # The compacted cache decodes on exactly: the bonus's next token is the target's own.
    logits = model.logits(model(new_bonus[:, None], full.lengths[:, None], full)[0])
    seq.append(int(model.logits(model(torch.tensor([seq]), torch.arange(len(seq))[None],
                                      model.new_cache(1, 40))[0])[0, -1].argmax()))
    assert int(logits[0, -1].argmax()) == seq[len(prompt) + 5]
