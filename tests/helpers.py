"""Small shared helpers for tests that build tiny models in-process."""
from __future__ import annotations

import tempfile

import torch

from conftest import make_hf_model
from flexdraft.model import load_model


def tiny_target(family="llama", seed=0, **overrides):
    """(our Transformer, the transformers model) for a fresh tiny random config."""
    hf = make_hf_model(family, seed=seed, **overrides)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        return load_model(d), hf


def random_prompts(vocab: int, lengths, seed=0, avoid=()):
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for n in lengths:
        p = torch.randint(0, vocab, (n,), generator=g)
        for a in avoid:
            p[p == a] = (a + 1) % vocab
        prompts.append(p.tolist())
    return prompts


class StubTokenizer:
    """What ``FlexDraft.generate`` needs of a tokenizer for a tiny model: no stop tokens, ids as text."""
    eos_token_id = None

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))
