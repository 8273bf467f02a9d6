"""``flexdraft data``: a self-distilled training corpus, built by the target itself with our batched runtime.

Prompts are ShareGPT first turns (evaluation prompts filtered out by ``assets.sharegpt_prompts``), or with
``turns="later"`` every later human turn with its history (``assets.sharegpt_later_turns``), wrapped in the chat
template; responses are the target's own greedy (or sampled) continuations. ``answer_again`` answers an existing
corpus's prompts once more (sampled answers beside greedy ones, no ShareGPT needed). The corpus is a JSON-lines
file appended one batch at a time, so an interrupt loses at most the batch in flight and a rerun resumes where it
stopped.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from flexdraft.errors import FlexDraftError


def prompt_key(prompt: str | list[dict]) -> str:
    text = json.dumps(prompt) if isinstance(prompt, list) else prompt.strip()
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def fit_prompt(fd, prompt: str | list[dict], max_tokens: int) -> list[int] | None:
    """The prompt's ids, or None when it does not fit ``max_tokens``. A chat sheds its oldest exchanges until it
    fits (it always starts at a user message); a string or the last turn alone that is too long is dropped."""
    while True:
        ids = fd.encode([prompt])[0]
        if len(ids) <= max_tokens:
            return ids
        if not isinstance(prompt, list):
            return None
        users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
        if len(users) < 2:
            return None
        prompt = prompt[users[1]:]


def is_held_out(key: str) -> bool:
    """A fixed 1-in-32 slice of prompts never trains: it measures acceptance during training."""
    return int(key, 16) % 32 == 0


def corpus_path(fingerprint: str, temperature: float) -> Path:
    from flexdraft.assets import cache_dir

    suffix = "greedy" if temperature == 0 else f"t{temperature:g}"
    return cache_dir() / "corpus" / f"{fingerprint}-{suffix}.jsonl"


def read_corpus(path: Path) -> list[dict]:
    """Rows of a corpus file; a torn last line (an interrupted append) is ignored."""
    rows = []
    if not path.exists():
        return rows
    with path.open() as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def cut_torn_tail(path: Path) -> None:
    """Drop an unfinished last line (an append cut off by an interrupt), so the next append starts a line of its
    own instead of gluing a good row onto the torn one."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


@dataclass
class DataConfig:
    num_prompts: int = 2000
    max_prompt_tokens: int = 256
    max_new_tokens: int = 160
    batch_size: int = 32
    temperature: float = 0.0
    seed: int = 0
    turns: str = "first"   # "first": ShareGPT first turns; "later": every later turn, with its history
    # "shortest": shortest prompts first (most prompts per second); "longest": longest first (the later turns no
    # drafter has seen: earlier corpora answered the shortest first); "given": the prompts' own order, a priority
    # (sorted only within windows of PRIORITY_WINDOW batches, so that batches still hold similar lengths)
    order: str = "shortest"

    def __post_init__(self):
        if self.order not in ORDERS:
            raise FlexDraftError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


ORDERS = ("shortest", "longest", "given")
PRIORITY_WINDOW = 8


def build_corpus(fd, config: DataConfig, prompts: list[str] | None = None, path: Path | None = None) -> Path:
    """Generate responses for up to ``num_prompts`` prompts not yet in the corpus; returns the corpus path."""
    if prompts is None:
        prompts = sharegpt_turns(config.turns)
    path = path or corpus_path(fd.model.fingerprint or "model", config.temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_torn_tail(path)
    done = {row["key"] for row in read_corpus(path)}
    todo = pending_prompts(fd, prompts, done, config.num_prompts - len(done), config.max_prompt_tokens)
    return write_responses(fd, todo, len(done), config, path)


def sharegpt_turns(turns: str) -> list:
    """ShareGPT's first human turns ("first"), or every later one with its history ("later")."""
    from flexdraft.assets import sharegpt_later_turns, sharegpt_prompts

    if turns not in ("first", "later"):
        raise FlexDraftError(f"turns must be 'first' or 'later', got {turns!r}")
    return sharegpt_prompts() if turns == "first" else sharegpt_later_turns()


def pending_prompts(fd, prompts: list, done: set[str], limit: int, max_prompt_tokens: int) -> list[tuple[str, list[int]]]:
    """``(key, ids)`` of up to ``limit`` prompts not yet answered (key not in ``done``), in order: deduplicated,
    an empty last turn skipped, one that cannot fit ``max_prompt_tokens`` dropped."""
    todo, seen = [], set(done)
    for prompt in prompts:
        if len(todo) >= limit:
            break
        key = prompt_key(prompt)
        if key in seen or not (prompt[-1]["content"] if isinstance(prompt, list) else prompt).strip():
            continue
        seen.add(key)
        ids = fit_prompt(fd, prompt, max_prompt_tokens)
        if ids is not None:
            todo.append((key, ids))
    return todo


def answer_again(fd, source: Path, config: DataConfig, path: Path | None = None) -> Path:
    """Answer the prompts of the corpus at ``source`` (or of any JSONL of ``{"key", "prompt_ids"}`` rows) into the
    corpus of ``config.temperature``: sampled answers beside greedy ones, or greedy answers to prompts tokenised
    elsewhere. The prompt ids come from the source, so no ShareGPT is needed, and each row keeps its prompt's key,
    so a prompt held out there is held out here too."""
    rows = read_corpus(Path(source))
    if not rows:
        raise FlexDraftError(f"no prompts in {source}: build a corpus with `flexdraft data` first")
    path = path or corpus_path(fd.model.fingerprint or "model", config.temperature)
    if Path(path).resolve() == Path(source).resolve():
        raise FlexDraftError(f"answering {source} again would append to it: pass another --temperature")
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_torn_tail(path)
    done = {row["key"] for row in read_corpus(path)}
    todo = [(row["key"], row["prompt_ids"]) for row in rows if row["key"] not in done]
    return write_responses(fd, todo[: max(0, config.num_prompts - len(done))], len(done), config, path)


def write_responses(fd, todo: list[tuple[str, list[int]]], already: int, config: DataConfig, path: Path) -> Path:
    """Generate a response for each ``(key, prompt ids)`` and append the rows to ``path``, a batch at a time."""
    from tqdm import tqdm

    from flexdraft.generate import generate_ar
    from flexdraft.sampling import SamplingParams

    if not todo:
        print(f"corpus {path} already holds {already} responses", file=sys.stderr)
        return path
    # Similar lengths batch together: less padding, fewer wasted prefill tokens.
    window = PRIORITY_WINDOW * config.batch_size if config.order == "given" else len(todo)
    todo = [item for start in range(0, len(todo), window)
            for item in sorted(todo[start: start + window], key=lambda item: len(item[1]),
                               reverse=config.order == "longest")]
    params = SamplingParams(temperature=config.temperature)
    stops = fd.stop_ids()
    with path.open("a") as out, tqdm(total=len(todo), desc="self-distilling", unit="prompt") as bar:
        for first in range(0, len(todo), config.batch_size):
            chunk = todo[first: first + config.batch_size]
            seeds = torch.tensor([int(key, 16) % (2 ** 31) + config.seed for key, _ in chunk])
            batch, stats = generate_ar(fd.model, [ids for _, ids in chunk], config.max_new_tokens, params,
                                       [stops] * len(chunk), seeds)
            tokens, reasons = batch.results()
            for (key, ids), response, reason in zip(chunk, tokens, reasons):
                out.write(json.dumps({"key": key, "prompt_ids": ids, "response_ids": response,
                                      "finish_reason": reason, "held_out": is_held_out(key)}) + "\n")
            out.flush()
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}")
    return path


def split_corpus(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    usable = [r for r in rows if len(r["response_ids"]) >= 4]
    if not usable:
        raise FlexDraftError("the corpus has no usable responses: run `flexdraft data` first")
    return [r for r in usable if not r["held_out"]], [r for r in usable if r["held_out"]]
