"""Tree verification: verify several drafts per block position in one target pass (greedy or sampling).

The drafter drafts a block's slots in parallel, so slot 2's candidates do not depend on which token slot 1 took: the
likeliest paths are products of per-slot candidates. A tree keeps the ``max_nodes`` paths of highest probability (the
product of their slots' draft probabilities) that reach ``threshold``. A child's probability never exceeds its parent's
and ties rank the shallower node first, so the kept set always holds every kept node's parent: it is a tree.
A chain of drafts (prompt-lookup copies: probability 1 at one candidate) is the tree of width 1.

Layout of a tree step per row, slots 0..N: slot 0 is the bonus (the root), slot j >= 1 a node. Node j stands at
RoPE position ``cache length + depth[j]`` but is written to cache slot ``cache length + j``; it sees the cache before
the step and its own ancestors (``ancestors``). After verification the accepted path's K/V move to the positions
they stand at (``compact``), so the cache is again a plain sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Nodes of a tree step by default: on a 2-core CPU at batch 1, 6-10 nodes gained the most (+0.3 tokens per step on
# MT-bench, +0.35 on HumanEval over the chain; more nodes cost more than they add). See reports/drafter/experiments.md.
TREE_NODES = 8


@dataclass
class DraftTree:
    tokens: torch.Tensor    # [B, N] node tokens
    parents: torch.Tensor   # [B, N] parent slot (0 = the bonus)
    depth: torch.Tensor     # [B, N] 1 for the bonus's children
    valid: torch.Tensor     # [B, N] False for padding (a row with fewer nodes): never accepted

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def ancestors(self) -> torch.Tensor:
        """[B, N+1, N+1] bool: slot i sees slot j (j is i or an ancestor of i); slot 0 is the root."""
        B, N = self.tokens.shape
        parent_of = torch.cat([torch.zeros(B, 1, dtype=torch.int64, device=self.tokens.device), self.parents], 1)
        eye = torch.eye(N + 1, dtype=torch.bool, device=self.tokens.device).expand(B, -1, -1)
        seen = eye
        for _ in range(int(self.depth.max()) if N else 0):   # each round reaches one generation further up
            seen = eye | seen.gather(1, parent_of[:, :, None].expand(-1, -1, N + 1))
        return seen


def build_tree(top_tokens: torch.Tensor, top_probs: torch.Tensor, max_nodes: int, threshold: float,
               max_depth: torch.Tensor | None = None) -> DraftTree:
    """The ``max_nodes`` likeliest paths with probability >= ``threshold`` (and > 0) per row.

    top_tokens, top_probs [B, W, K]: each slot's K likeliest drafts, likeliest first. ``max_depth`` [B] caps a row's
    depth (the room it has left). A node's path probability is the product of its slots' probabilities.
    """
    B, W, K = top_tokens.shape
    device = top_tokens.device
    probs = top_probs.float()
    if max_depth is not None:
        probs = probs * (torch.arange(W, device=device)[None, :, None] < max_depth[:, None, None])
    keep = min(max_nodes, K)
    # Frontier per depth: the ``max_nodes`` likeliest nodes of that depth (a node of the global top-N is within the
    # top-N of its own depth, and so is its parent). Ids index the concatenation of all depths' frontiers.
    layer_prob, layer_choice = probs[:, 0].topk(keep, dim=1)
    layer_parent = torch.full((B, keep), -1, dtype=torch.int64, device=device)
    all_prob, all_token, all_parent, all_depth = [], [], [], []
    offset = 0
    for d in range(W):
        if d > 0:
            joint = (layer_prob[:, :, None] * probs[:, d, None, :]).flatten(1)     # [B, F*K]
            keep = min(max_nodes, joint.shape[1])
            prev_offset = offset - layer_prob.shape[1]
            layer_prob, flat = joint.topk(keep, dim=1)
            layer_parent = prev_offset + flat // K
            layer_choice = flat % K
        all_prob.append(layer_prob)
        all_token.append(top_tokens[:, d].gather(1, layer_choice))
        all_parent.append(layer_parent)
        all_depth.append(torch.full_like(layer_parent, d + 1))
        offset += layer_prob.shape[1]
    prob, token = torch.cat(all_prob, 1), torch.cat(all_token, 1)
    parent, depth = torch.cat(all_parent, 1), torch.cat(all_depth, 1)
    usable = (prob >= threshold) & (prob > 0)
    # Rank: likeliest first, the shallower first on ties (so parents precede children); unusable nodes last.
    score = torch.where(usable, prob.double() - depth.double() * 1e-12, torch.full_like(prob, -1.0, dtype=torch.float64))
    order = score.argsort(dim=1, descending=True, stable=True)[:, :max_nodes]
    valid = usable.gather(1, order)
    width = max(int(valid.sum(1).max()), 1)
    order, valid = order[:, :width], valid[:, :width]
    slot_of = torch.zeros(B, prob.shape[1] + 1, dtype=torch.int64, device=device)   # id -> slot; id -1 -> 0 (root)
    slot_of[:, 1:].scatter_(1, order, torch.arange(1, width + 1, device=device).expand(B, -1).contiguous())
    parents = slot_of.gather(1, parent.gather(1, order) + 1)
    return DraftTree(tokens=token.gather(1, order), parents=torch.where(valid, parents, 0),
                     depth=torch.where(valid, depth.gather(1, order), 1), valid=valid)


def walk(tree: DraftTree, choose, kv_len: torch.Tensor):
    """Walk the tree from the root: at each node ``choose(slot [B]) -> token [B]`` picks the target's token there (its
    argmax, or a sample from its distribution); a child holding that token is accepted and the walk goes on from it,
    otherwise the chosen token is the step's resolved token. Sampling stays exact because the tree does not depend on
    the target's choices: each token of the output is one draw from the target at the path before it.

    Returns (tokens [B, D+1] padded -1: the accepted path then the resolved token, accept_len [B], path [B, D]: the
    accepted nodes' slots, 0 past accept_len, new cache length [B]); D = the tree's depth."""
    B, N = tree.tokens.shape
    D = int(tree.depth.max()) if N else 0
    at = torch.zeros(B, dtype=torch.int64, device=tree.tokens.device)
    accept_len, resolved = torch.zeros_like(at), torch.zeros_like(at)
    walking = torch.ones(B, dtype=torch.bool, device=at.device)
    path = torch.zeros(B, D, dtype=torch.int64, device=at.device)
    tokens = torch.full((B, D + 1), -1, dtype=torch.int64, device=at.device)
    for d in range(D + 1):
        wanted = choose(at)
        match = tree.valid & (tree.parents == at[:, None]) & (tree.tokens == wanted[:, None])
        # Siblings hold distinct tokens (one slot's distinct candidates), so at most one child matches.
        hit = match.any(1) & walking
        resolved = torch.where(walking & ~hit, wanted, resolved)
        walking &= hit
        if d == D or not bool(walking.any()):   # past here no row moves; a sampled choice costs a draw each
            break
        child = match.to(torch.int64).argmax(1) + 1
        at = torch.where(hit, child, at)
        path[:, d] = torch.where(hit, child, 0)
        tokens[:, d] = torch.where(hit, wanted, -1)
        accept_len += hit.to(torch.int64)
    tokens = tokens.scatter(1, accept_len[:, None], resolved[:, None])
    return tokens, accept_len, path, kv_len + accept_len + 1


def greedy_choice(target_argmax: torch.Tensor):
    """``walk``'s choice for greedy decoding: the target's argmax at each slot ([B, N+1])."""
    return lambda at: target_argmax.gather(1, at[:, None]).squeeze(1)


def compact(cache, kv_len: torch.Tensor, path: torch.Tensor, accept_len: torch.Tensor) -> None:
    """Move the accepted nodes' K/V (written at slot ``kv_len + path[d]``) to position ``kv_len + 1 + d``, in every
    layer at once. Slots only move down (path[d] >= d + 1) and all are read before any is written."""
    if path.shape[1] == 0:
        return
    depth = torch.arange(path.shape[1], device=path.device)[None, :]
    dest = kv_len[:, None] + 1 + depth
    source = torch.where(depth < accept_len[:, None], kv_len[:, None] + path, dest)
    rows = torch.arange(path.shape[0], device=path.device)[:, None].expand_as(dest)
    cache.k[:, rows, :, dest] = cache.k[:, rows, :, source]
    cache.v[:, rows, :, dest] = cache.v[:, rows, :, source]
