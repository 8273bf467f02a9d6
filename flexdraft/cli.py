"""The ``flexdraft`` command line. Every user error is one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.cli import COMMANDS as EXPERIMENT_COMMANDS
from experiments.cli import add_device_arg
from experiments.cli import add_parsers as add_experiment_parsers
from flexdraft.data import ORDERS
from flexdraft.errors import FlexDraftError
from flexdraft.lookup import COPY_LEN, LONGEST_COPY
from flexdraft.speculative import VERIFY_THRESHOLD
from flexdraft.tree import TREE_NODES
from kernels import backend


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def read_prompts_file(path: str) -> list[str]:
    """JSON lines with a ``prompt`` field, or MT-bench's ``turns`` (its first turn)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise FlexDraftError(f"cannot read prompts file {path}: {exc.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(row["prompt"] if "prompt" in row else row["turns"][0])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise FlexDraftError(f"{path}:{number}: expected a JSON object with a 'prompt' or 'turns' field") from None
    if not prompts:
        raise FlexDraftError(f"no prompts in {path}")
    return prompts


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF checkpoint dir")
    p.add_argument("--mode", default="ar", choices=["ar", "sequential", "parallel", "flex"])
    p.add_argument("--drafter", default=None, help="PATH, 'default' (shipped, trained) or 'untrained'")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backend", default="torch", choices=["torch", "triton"],
                   help="attention/verification/draft-head implementation (triton runs interpreted on a CPU)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--verify-threshold", type=float, default=VERIFY_THRESHOLD,
                   help="verify drafts while their cumulative confidence reaches this (default %(default)s)")
    p.add_argument("--verify-strategy", default="cumulative_product", choices=["cumulative_product", "min_confidence"])
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--no-lookup", action="store_true",
                   help="draft with the drafter alone, never copying where the text repeats itself (prompt lookup)")
    p.add_argument("--lookup-len", type=int, default=COPY_LEN,
                   help=f"tokens a prompt-lookup copy drafts while one sequence is decoding (default {COPY_LEN}); "
                   "in a batch, copies draft the drafter's block size - 1, and never fewer")
    p.add_argument("--longest-copy", type=int, default=LONGEST_COPY,
                   help="while one sequence is decoding, a copy accepted whole doubles the next one, up to this many "
                   f"tokens (default {LONGEST_COPY}; at most --lookup-len: no growth)")
    p.add_argument("--tree-nodes", type=int, default=TREE_NODES,
                   help="sequential steps verify a tree of up to this many drafts, the likeliest paths through "
                   "each block position's candidates, at batch 1 (default %(default)s; 0: a chain of the likeliest drafts)")
    p.add_argument("--parallel-trees", action="store_true",
                   help="parallel steps verify trees too, with a mask group per node (slower on a CPU)")
    add_device_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="flexdraft", description="FlexDraft speculative decoding lab")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    gen = sub.add_parser("generate", help="generate text in any mode")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts-file", help="JSON lines with 'prompt' (or MT-bench 'turns')")
    add_generation_args(gen)
    gen.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    data = sub.add_parser("data", help="build the self-distilled training corpus (cached, resumable)")
    data.add_argument("--model", default="default")
    data.add_argument("--num-prompts", type=int, default=2000,
                      help="grow the corpus to this many responses (rows already there count)")
    data.add_argument("--max-new-tokens", type=int, default=160)
    data.add_argument("--max-prompt-tokens", type=int, default=256)
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--temperature", type=float, default=0.0, help="0: greedy responses; > 0: sampled")
    data.add_argument("--turns", default="first", choices=["first", "later"],
                      help="ShareGPT first human turns, or every later one with its history (the oldest exchanges "
                           "shed to fit --max-prompt-tokens); both land in the same corpus")
    data.add_argument("--from-corpus", default=None,
                      help="answer the prompts of this corpus file (or JSONL of key / prompt_ids rows) instead of "
                           "ShareGPT's, into the corpus of --temperature (> 0: sampled, a corpus of their own)")
    data.add_argument("--dtype", default="bfloat16" if backend.cpu_bf16_is_fast() else "float32",
                      choices=["float32", "bfloat16"], help="default: bfloat16 where this CPU's bf16 GEMM is fast")
    data.add_argument("--order", default="shortest", choices=ORDERS,
                      help="shortest prompts first (most prompts per second), longest first (the later turns no "
                           "drafter has seen), or the prompts' own order as a priority (--from-corpus files "
                           "written in priority order; a deadline keeps the first)")
    add_device_arg(data)

    train = sub.add_parser("train", help="train a drafter (attention tuning + calibration) on the corpus")
    train.add_argument("--model", default="default")
    train.add_argument("--out", required=True, help="run directory: <out>/drafter (use it) and <out>/state (resume)")
    train.add_argument("--corpus", nargs="+", default=None,
                       help="corpus JSONL files, trained on together (default: the greedy one `flexdraft data` "
                            "built); the held-out evaluation takes the first file's held-out answers first")
    train.add_argument("--fresh", action="store_true", help="start over instead of resuming from <out>/state")
    train.add_argument("--init-from", default=None,
                       help="start from a saved drafter (e.g. flexdraft/drafters/...) instead of a fresh one")
    add_device_arg(train)
    from dataclasses import fields

    from flexdraft.train import TrainConfig
    for f in fields(TrainConfig):   # one flag per setting; annotations are strings here ("bool | None", ...)
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split(" |")[0]
        if kind == "bool":
            train.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=f.default)
        else:
            train.add_argument(flag, type={"int": int, "float": float}[kind], default=f.default)

    ev = sub.add_parser("evaluate", help="a drafter's acceptance and speed on MT-bench and HumanEval (batch 1)")
    ev.add_argument("--model", default="default")
    ev.add_argument("--drafter", default="default")
    ev.add_argument("--mtbench", type=int, default=80, help="how many MT-bench prompts (first turns)")
    ev.add_argument("--humaneval", type=int, default=164, help="how many HumanEval prompts")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--out", default="reports/drafter/acceptance", help="output path stem (.json and .md)")
    ev.add_argument("--training-state", default=None,
                    help="a run's state/state.json: adds its configuration and held-out acceptance curve")
    ev.add_argument("--quick", action="store_true",
                    help="ar, sequential and parallel only (to compare drafters in about half the time)")
    add_device_arg(ev)

    tune = sub.add_parser("autotune", help="sweep kernel configurations on this GPU into autotune/configs/<device>.json")
    tune.add_argument("--out", default=None, help="store path (default: autotune/configs/<device>.json)")
    tune.add_argument("--quick", action="store_true", help="the small configuration space")

    sub.add_parser("fetch", help="download and convert the default model and the data sets (cached)")
    demo = sub.add_parser("demo", help="the main job: answer MT-bench prompts, then a short benchmark of every mode and transformers, and its report")
    demo.add_argument("--prompts", type=int, default=4)
    demo.add_argument("--max-new-tokens", type=int, default=64)
    add_experiment_parsers(sub)  # roofline, bench, report
    return parser


def command_generate(args) -> int:
    from flexdraft.api import FlexDraft

    from flexdraft.sampling import SamplingParams

    backend.set_backend(args.backend)
    prompts = args.prompt if args.prompt else read_prompts_file(args.prompts_file)
    # Check what needs no model before loading one: bad input fails in milliseconds.
    if any(not p.strip() for p in prompts):
        raise FlexDraftError("empty prompt: give some text to continue")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise FlexDraftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as exc:
        raise FlexDraftError(str(exc)) from None
    drafter = args.drafter
    if drafter is None and args.mode != "ar":
        drafter = "default"
    fd = FlexDraft.load(args.model, args.dtype, drafter, args.block_size, args.device)
    if args.mode != "ar" and args.dtype == "bfloat16" and fd.model.device.type == "cpu":
        print("flexdraft: note: bf16 on a CPU is not batch invariant, so speculative output may differ from bf16 ar; "
              "use --dtype float32 for lossless decoding", file=sys.stderr)
    result = fd.generate(prompts, mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                         raw=args.raw, verify_threshold=args.verify_threshold,
                         verify_strategy=args.verify_strategy, calibration=not args.no_calibration,
                         lookup=not args.no_lookup, lookup_len=args.lookup_len,
                         longest_copy=args.longest_copy, tree_nodes=args.tree_nodes,
                         parallel_trees=args.parallel_trees)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    for out in result.outputs:
        print(out["text"])
        print()
    s = result.stats
    print(f"[{result.mode}] {s.new_tokens} tokens in {s.seconds:.2f} s: {s.tokens_per_s:.1f} tokens/s, "
          f"{s.target_forwards} target forwards, mean accepted {s.mean_accepted:.2f}", file=sys.stderr)
    if result.policy:
        print(f"[flex] steps by mode {s.mode_steps}; policy: {result.policy}", file=sys.stderr)
    return 0


def command_data(args) -> int:
    from flexdraft.api import FlexDraft
    from flexdraft.data import DataConfig, answer_again, build_corpus

    if args.num_prompts < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise FlexDraftError("--num-prompts, --batch-size and --max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise FlexDraftError("--temperature must be >= 0")
    fd = FlexDraft.load(args.model, args.dtype, device=args.device)
    config = DataConfig(args.num_prompts, args.max_prompt_tokens, args.max_new_tokens, args.batch_size,
                        args.temperature, turns=args.turns, order=args.order)
    path = answer_again(fd, Path(args.from_corpus), config) if args.from_corpus else build_corpus(fd, config)
    print(path)
    return 0


def command_train(args) -> int:
    from dataclasses import fields

    from flexdraft.api import FlexDraft
    from flexdraft.data import corpus_path, read_corpus, split_corpus
    from flexdraft.train import TrainConfig, split_states_path, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if config.steps < 1 or config.block_size < 2 or config.sequences_per_step < 1:
        raise FlexDraftError("--steps and --sequences-per-step must be at least 1, --block-size at least 2")
    fd = FlexDraft.load(args.model, "float32", device=args.device)
    paths = [Path(p) for p in args.corpus] if args.corpus else [corpus_path(fd.model.fingerprint, 0.0)]
    rows, held_out, stores = [], [], []
    for path in paths:
        if not path.is_file():
            raise FlexDraftError(f"no corpus at {path}: build one with `flexdraft data`")
        part, part_held_out = split_corpus(read_corpus(path))
        print(f"corpus {path}: {len(part)} training and {len(part_held_out)} held-out responses", file=sys.stderr)
        rows, held_out = rows + part, held_out + part_held_out
        stores.append((part + part_held_out, split_states_path(path)))
    train(fd.model, rows, held_out, Path(args.out), config, resume=not args.fresh,
          log=lambda m: print(m, file=sys.stderr), init_from=Path(args.init_from) if args.init_from else None,
          state_stores=stores)
    print(Path(args.out) / "drafter")
    return 0


def command_evaluate(args) -> int:
    from flexdraft.evaluate import run

    run(args.drafter, Path(args.out), args.mtbench, args.humaneval, args.max_new_tokens, args.model,
        Path(args.training_state) if args.training_state else None, args.device, args.quick)
    return 0


def command_autotune(args) -> int:
    import torch

    from autotune.sweep import run_sweep

    if not torch.cuda.is_available():
        raise FlexDraftError("autotuning needs a CUDA GPU; on a CPU the kernels run interpreted with a fixed config")
    print(run_sweep(args.out, quick=args.quick))
    return 0


def command_fetch(args) -> int:
    from flexdraft.assets import fetch_all

    fetch_all()
    return 0


def command_demo(args) -> int:
    from flexdraft.demo import run_demo

    return run_demo(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens)


COMMANDS = {"generate": command_generate, "fetch": command_fetch, "demo": command_demo, "data": command_data,
            "train": command_train, "evaluate": command_evaluate, "autotune": command_autotune, **EXPERIMENT_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FlexDraftError as exc:
        print(f"flexdraft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexdraft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
