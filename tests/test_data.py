"""`flexdraft data`: the corpus is resumable, deduplicated, survives a torn append, and chats shed old exchanges to fit."""
from __future__ import annotations

import json

import pytest
import torch

from flexdraft.data import DataConfig, build_corpus, fit_prompt, prompt_key, read_corpus
from helpers import tiny_target

ROLE_MARK = {"user": 1, "assistant": 2}


class CharChat:
    """A stand-in for ``FlexDraft`` over a tiny random target: one token per character, a role mark per message."""

    def __init__(self):
        self.model, _ = tiny_target("llama", seed=3)
        self.encoded = []

    def encode(self, prompts):
        out = []
        for prompt in prompts:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = []
            for m in messages:
                ids += [ROLE_MARK[m["role"]]] + [3 + ord(c) % 90 for c in m["content"]]
            out.append(ids + [2])
        self.encoded += out
        return out

    def stop_ids(self):
        return []


def chat(*contents):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


def test_a_chat_sheds_its_oldest_exchanges_until_it_fits():
    fd = CharChat()
    long_chat = chat("a" * 20, "b" * 30, "c" * 10, "d" * 25, "what now?")
    assert fit_prompt(fd, long_chat, 200) == fd.encode([long_chat])[0]    # 100 ids: fits whole
    assert fit_prompt(fd, long_chat, 60) == fd.encode([chat("c" * 10, "d" * 25, "what now?")])[0]
    assert fit_prompt(fd, long_chat, 12) == fd.encode(["what now?"])[0]    # the last turn alone
    assert fit_prompt(fd, long_chat, 8) is None                            # even that is too long
    assert fit_prompt(fd, "x" * 9, 8) is None and fit_prompt(fd, "x" * 5, 8) is not None


def test_the_corpus_resumes_deduplicates_and_survives_a_torn_append(tmp_path):
    fd = CharChat()
    prompts = ["hello there", "hello there", "  ", "write a poem", chat("hi", "hey", "go on"), "count to ten",
               "x" * 60, chat("hi", "hey", "go on"), "why is the sky blue"]
    path = tmp_path / "corpus.jsonl"
    config = DataConfig(num_prompts=3, max_prompt_tokens=40, max_new_tokens=6, batch_size=2)
    build_corpus(fd, config, prompts, path)
    first = read_corpus(path)
    assert len(first) == 3 and len({r["key"] for r in first}) == 3

    # An interrupt mid-append leaves half a line; the next run must cut it, not glue a row onto it.
    with path.open("a") as f:
        f.write(json.dumps(first[0])[:25])
    fd.encoded.clear()
    build_corpus(fd, DataConfig(**{**config.__dict__, "num_prompts": 100}), prompts, path)
    rows = read_corpus(path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows   # every line whole
    # Duplicates once; the blank prompt and the one too long for 40 tokens dropped; the first run's rows kept.
    kept = ["hello there", "write a poem", chat("hi", "hey", "go on"), "count to ten", "why is the sky blue"]
    assert [r["key"] for r in rows[:3]] == [r["key"] for r in first] and rows[:3] == first
    assert sorted(r["key"] for r in rows) == sorted(prompt_key(p) for p in kept)
    for row in rows:
        assert 1 <= len(row["response_ids"]) <= 6 and row["finish_reason"] in ("length", "stop")
        assert row["held_out"] == (int(row["key"], 16) % 32 == 0)
    # Only the new prompts ran through the target (ids of the resumed run's rows, not the first run's).
    assert sorted(map(tuple, (r["prompt_ids"] for r in rows[3:]))) == sorted(
        tuple(ids) for ids in fd.encoded if len(ids) <= 40)

    # Rows are the target's own greedy continuations.
    from flexdraft.generate import generate_ar
    from flexdraft.sampling import SamplingParams
    row = rows[-1]
    batch, _ = generate_ar(fd.model, [row["prompt_ids"]], 6, SamplingParams(), [[]], torch.tensor([0]))
    assert batch.results()[0][0] == row["response_ids"]


def test_unknown_turns_is_a_clear_error(tmp_path):
    from flexdraft.errors import FlexDraftError
    with pytest.raises(FlexDraftError, match="turns"):
        build_corpus(CharChat(), DataConfig(turns="middle"), None, tmp_path / "c.jsonl")


def test_answering_a_corpus_again_samples_its_own_prompts_with_their_keys(tmp_path):
    """`flexdraft data --from-corpus GREEDY --temperature T`: the same prompt ids, the same keys (so the same
    held-out split), sampled answers in a file of their own, resumable."""
    from flexdraft.data import answer_again
    from flexdraft.errors import FlexDraftError
    from flexdraft.generate import generate_ar
    from flexdraft.sampling import SamplingParams

    fd = CharChat()
    source = tmp_path / "greedy.jsonl"
    prompts = ["hello there", "write a poem", chat("hi", "hey", "go on"), "count to ten", "why is the sky blue"]
    build_corpus(fd, DataConfig(num_prompts=10, max_new_tokens=12, batch_size=2), prompts, source)
    greedy = read_corpus(source)
    sampled_path = tmp_path / "t1.jsonl"
    config = DataConfig(num_prompts=3, max_new_tokens=12, batch_size=2, temperature=1.0)
    answer_again(fd, source, config, sampled_path)
    assert len(read_corpus(sampled_path)) == 3
    answer_again(fd, source, DataConfig(**{**config.__dict__, "num_prompts": 10}), sampled_path)
    sampled = read_corpus(sampled_path)
    by_key = {r["key"]: r for r in greedy}
    assert sorted(r["key"] for r in sampled) == sorted(by_key)
    for row in sampled:
        assert row["prompt_ids"] == by_key[row["key"]]["prompt_ids"]
        assert row["held_out"] == by_key[row["key"]]["held_out"]
    # Sampled, not greedy: at temperature 1 over a random tiny model most answers differ from the greedy ones.
    assert sum(r["response_ids"] != by_key[r["key"]]["response_ids"] for r in sampled) >= 4
    row = sampled[0]   # and each is the target's own sample under its row's seed
    seed = torch.tensor([int(row["key"], 16) % (2 ** 31)])
    batch, _ = generate_ar(fd.model, [row["prompt_ids"]], 12, SamplingParams(temperature=1.0), [[]], seed)
    assert batch.results()[0][0] == row["response_ids"]
    with pytest.raises(FlexDraftError, match="would append to it"):
        answer_again(fd, source, config, source)
    with pytest.raises(FlexDraftError, match="no prompts in"):
        answer_again(fd, tmp_path / "missing.jsonl", config, sampled_path)


def test_a_priority_order_is_answered_in_windows_of_batches(tmp_path):
    """`--order given`: a prompts file written in priority order is answered in that order, sorted by length only
    within windows of PRIORITY_WINDOW batches; the default answers the shortest prompts first overall, `longest`
    the longest."""
    from flexdraft.data import PRIORITY_WINDOW, answer_again

    fd = CharChat()
    lengths = [30, 29, 3, 28, 27, 26, 25, 24, 23, 2, 22, 21, 20, 19, 18, 17, 16, 15]   # the short ones come late
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"key": f"{i:04x}", "prompt_ids": [1] + [5] * n}) + "\n"
                              for i, n in enumerate(lengths)))
    windows = [sorted(lengths[k: k + PRIORITY_WINDOW]) for k in range(0, len(lengths), PRIORITY_WINDOW)]
    assert len(windows) == 3 and windows[1][0] == 2
    for order, expected in (("shortest", sorted(lengths)), ("longest", sorted(lengths, reverse=True)),
                            ("given", sum(windows, []))):
        out = tmp_path / f"{order}.jsonl"
        answer_again(fd, source, DataConfig(num_prompts=100, max_new_tokens=2, batch_size=1, order=order), out)
        assert [len(r["prompt_ids"]) - 1 for r in read_corpus(out)] == expected
    with pytest.raises(Exception, match="order must be one of"):
        answer_again(fd, source, DataConfig(order="random"), tmp_path / "bad.jsonl")
