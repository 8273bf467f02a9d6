"""What users would otherwise run: transformers ``generate`` (plain, and prompt-lookup decoding at batch 1)."""
from __future__ import annotations

import time
from pathlib import Path

import torch


def load_hf_model(path: Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


@torch.no_grad()
def hf_generate(hf_model, prompt_ids: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                batch_size: int = 1, pad_id: int = 0, prompt_lookup: bool = False) -> tuple[list[list[int]], float]:
    """Greedy generation, left-padded batches; returns the new tokens per prompt and the wall time."""
    outputs, seconds = [], 0.0
    for first in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[first: first + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=hf_model.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=hf_model.device)
        extra = {"prompt_lookup_num_tokens": 10} if prompt_lookup else {}
        start = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_ids, pad_token_id=pad_id, **extra)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        seconds += time.perf_counter() - start
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
            outputs.append(row[:cut])
    return outputs, seconds
