"""The Python API: load a target (and a drafter), then generate in any mode.

    from flexdraft.api import FlexDraft
    fd = FlexDraft.load("default", drafter="default")
    result = fd.generate(["Write a haiku about GPUs."], mode="parallel", max_new_tokens=64)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexdraft.batch import Stats
from flexdraft.errors import FlexDraftError
from flexdraft.lookup import COPY_LEN, LONGEST_COPY
from flexdraft.tree import TREE_NODES
from flexdraft.sampling import SamplingParams
from flexdraft.speculative import VERIFY_THRESHOLD

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("ar", "sequential", "parallel", "flex")
SHIPPED_DRAFTERS = Path(__file__).parent / "drafters"
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")


def resolve_device(device: str) -> str:
    """A ``--device`` value -> a torch device: 'auto' is the CUDA GPU where torch sees one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise FlexDraftError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise FlexDraftError(f"--device {device}: this torch sees no CUDA GPU (use --device cpu)")
    return device


def resolve_model_path(model: str | Path) -> Path:
    if str(model) == "default":
        from flexdraft.assets import default_model_dir

        return default_model_dir()
    return Path(model).expanduser()


def load_tokenizer(path: Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for missing or broken tokenizer files
        raise FlexDraftError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


@dataclass
class GenerationResult:
    mode: str
    model: str
    outputs: list[dict]
    stats: Stats = field(default_factory=Stats)
    policy: str | None = None   # flex: where its choices came from (a measured store entry, or the default)

    def as_dict(self) -> dict:
        out = {"mode": self.mode, "model": self.model, "outputs": self.outputs, "stats": self.stats.as_dict()}
        return out if self.policy is None else {**out, "policy": self.policy}


def merge_stats(total: Stats, part: Stats) -> None:
    total.new_tokens += part.new_tokens
    total.seconds += part.seconds
    total.target_forwards += part.target_forwards
    total.row_forwards += part.row_forwards
    total.mask_tokens += part.mask_tokens
    total.lookup_drafts += part.lookup_drafts
    width = max(len(total.accept_histogram), len(part.accept_histogram))
    total.accept_histogram = [a + b for a, b in zip(total.accept_histogram + [0] * (width - len(total.accept_histogram)),
                                                     part.accept_histogram + [0] * (width - len(part.accept_histogram)))]
    for key, value in part.timings.items():
        total.timings[key] = total.timings.get(key, 0.0) + value
    for key, value in part.mode_steps.items():
        total.mode_steps[key] = total.mode_steps.get(key, 0) + value


class FlexDraft:
    def __init__(self, model, tokenizer, model_name: str, drafter=None):
        self.model, self.tokenizer, self.model_name, self.drafter = model, tokenizer, model_name, drafter

    @classmethod
    def load(cls, model: str | Path = "default", dtype: str = "float32", drafter: str | None = None,
             block_size: int | None = None, device: str = "cpu") -> "FlexDraft":
        from flexdraft.model import load_model

        if dtype not in DTYPES:
            raise FlexDraftError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        device = resolve_device(device)   # before any loading: a bad --device fails in milliseconds
        path = resolve_model_path(model)
        target = load_model(path, DTYPES[dtype], device)
        tokenizer = load_tokenizer(path)
        fd = cls(target, tokenizer, str(model))
        if drafter is not None:
            fd.drafter = fd.load_drafter(drafter, block_size)
        return fd

    def load_drafter(self, spec: str, block_size: int | None = None):
        from flexdraft.drafter import Drafter

        if spec == "untrained":
            return Drafter.initialise(self.model, block_size=block_size or 16, seed=0)
        if spec == "default":
            path = shipped_drafter_for(self.model)
            if path is None:
                raise FlexDraftError("no trained drafter ships for this target: train one with `flexdraft train`, "
                                     "or pass --drafter untrained (lossless, but slow)")
        else:
            path = Path(spec).expanduser()
        drafter = Drafter.load(path, self.model)
        if block_size is not None and block_size != drafter.block_size:
            if not 2 <= block_size:
                raise FlexDraftError(f"--block-size must be at least 2, got {block_size}")
            drafter.block_size = block_size  # a smaller block drafts fewer slots with the same weights
        return drafter

    # ---- prompts ---------------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str | list[dict]], raw: bool = False) -> list[list[int]]:
        """Token ids per prompt: a string (one user turn), or a chat as ``[{"role", "content"}, ...]`` ending with the
        user turn to answer; both wrapped in the chat template unless ``raw`` (strings only)."""
        encoded = []
        for prompt in prompts:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if not messages or not (messages[-1].get("content") or "").strip():
                raise FlexDraftError("empty prompt: give some text to continue")
            if isinstance(prompt, str) and (raw or not getattr(self.tokenizer, "chat_template", None)):
                ids = self.tokenizer(prompt).input_ids
            else:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise FlexDraftError("a chat prompt needs a tokenizer with a chat template")
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False).input_ids
            encoded.append(list(ids))
        return encoded

    def stop_ids(self) -> list[int]:
        stops = set(self.model.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        stops.update(vocab[t] for t in END_OF_TURN if t in vocab)
        return sorted(stops)

    # ---- generation ------------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str] | None = None, *, prompt_ids: list[list[int]] | None = None,
                 mode: str = "ar", max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 1, raw: bool = False,
                 verify_threshold: float = VERIFY_THRESHOLD, verify_strategy: str = "cumulative_product",
                 calibration: bool = True, lookup: bool = True, lookup_len: int = COPY_LEN,
                 longest_copy: int = LONGEST_COPY, tree_nodes: int = TREE_NODES,
                 parallel_trees: bool = False) -> GenerationResult:
        from flexdraft.generate import generate_ar
        from flexdraft.speculative import SpecConfig, generate_speculative

        if mode not in MODES:
            raise FlexDraftError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        if max_new_tokens < 1:
            raise FlexDraftError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if batch_size < 1:
            raise FlexDraftError(f"--batch-size must be at least 1, got {batch_size}")
        try:
            params = SamplingParams(temperature, top_k, top_p)
            spec = SpecConfig(verify_threshold, verify_strategy, calibration, lookup, lookup_len, longest_copy,
                              tree_nodes=tree_nodes, parallel_trees=parallel_trees)
        except ValueError as exc:
            raise FlexDraftError(str(exc)) from None
        if mode != "ar" and self.drafter is None:
            raise FlexDraftError(f"--mode {mode} needs a drafter: pass --drafter default (a shipped trained one), "
                                 "--drafter PATH (from `flexdraft train`) or --drafter untrained")
        if prompt_ids is None:
            prompt_ids = self.encode(prompts or [], raw)
        if not prompt_ids:
            raise FlexDraftError("no prompts given")
        context = self.model.config.max_position_embeddings
        for ids in prompt_ids:
            if len(ids) == 0:
                raise FlexDraftError("empty prompt: give some text to continue")
            if len(ids) + max_new_tokens > context:
                raise FlexDraftError(f"prompt of {len(ids)} tokens plus --max-new-tokens {max_new_tokens} exceeds "
                                     f"the model's context of {context} tokens")
        step_mode = mode
        if mode == "flex":
            from experiments.crossover import flex_policy

            step_mode = flex_policy(self.model, self.drafter).controller()   # one per call: it learns as it goes
        stops = self.stop_ids()
        total, outputs = Stats(), []
        for first in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[first: first + batch_size]
            seeds = torch.arange(first, first + len(chunk)) + seed * 1_000_003
            stop_lists = [stops] * len(chunk)
            # Batches only shrink: flex choosing ar at every size this chunk can reach is plain ar (no drafter work).
            plain_ar = mode == "flex" and all(step_mode.modes_at(b) == {"ar"} for b in range(1, len(chunk) + 1))
            if mode == "ar" or plain_ar:
                batch, stats = generate_ar(self.model, chunk, max_new_tokens, params, stop_lists, seeds)
                if mode == "flex":
                    stats.mode_steps["ar"] = stats.target_forwards - 1
            else:
                batch, stats = generate_speculative(self.model, self.drafter, chunk, max_new_tokens, params,
                                                    stop_lists, seeds, step_mode, spec)
            merge_stats(total, stats)
            tokens, reasons = batch.results()
            for i, (ids, out, reason) in enumerate(zip(chunk, tokens, reasons)):
                outputs.append({"prompt": (prompts[first + i] if prompts else None), "prompt_token_ids": ids,
                                "token_ids": out, "text": self.tokenizer.decode(out, skip_special_tokens=True),
                                "finish_reason": reason})
        return GenerationResult(mode, self.model_name, outputs, total, getattr(step_mode, "source", None))


def shipped_drafter_for(target) -> Path | None:
    """The committed drafter whose recorded target identity matches this target, if any."""
    import json

    from flexdraft.drafter import CONFIG_FILE
    from flexdraft.model import model_identity

    if not SHIPPED_DRAFTERS.is_dir():
        return None
    identity = model_identity(target)
    for candidate in sorted(SHIPPED_DRAFTERS.iterdir()):
        config = candidate / CONFIG_FILE
        if config.is_file() and json.loads(config.read_text()).get("target") == identity:
            return candidate
    return None
