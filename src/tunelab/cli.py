"""`tunelab train | data | chat | demo`: argument parsing only; the work is in the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .errors import TunelabError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if not verbose else logging.DEBUG, stream=sys.stderr,
                        format="[tunelab] %(message)s")
    logging.getLogger("tunelab").setLevel(logging.INFO)
    for noisy in ("transformers", "peft", "accelerate", "datasets", "torch", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # weight loading/saving bars; the training bar is tunelab's own
    except ImportError:
        pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune open LLMs from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune as CONFIG.yaml says (key=value overrides win)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", metavar="key=value")

    d = sub.add_parser("data", help="report on the data a config would train on")
    d.add_argument("config")
    d.add_argument("overrides", nargs="*", metavar="key=value")
    d.add_argument("--samples", type=int, default=3, help="rendered samples to show")
    d.add_argument("--jsonl", action="store_true", help="write {input_ids, labels} per sample to stdout instead")

    c = sub.add_parser("chat", help="talk to a base model, a fine-tuned folder, or base + adapter")
    c.add_argument("--model", required=True, help="a model folder or a tunelab run folder")
    c.add_argument("--adapter", help="a LoRA adapter folder (a tunelab run folder)")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--prompt", help="answer this one prompt and exit")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    m = sub.add_parser("demo", help="build a tiny model, fine-tune it on the persona data, and chat with it")
    m.add_argument("--output-dir", default="demo_run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        return _run(args)
    except TunelabError as exc:
        print(f"tunelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "train":
        from .config import load_config
        from .train.run import train

        result = train(load_config(args.config, args.overrides))
        print(f"saved to {result.output_dir}")
        return 0
    if args.command == "data":
        from .config import load_config
        from .data.report import data_report, write_jsonl

        cfg = load_config(args.config, args.overrides)
        if args.jsonl:
            write_jsonl(cfg, sys.stdout)
        else:
            print(data_report(cfg, n_samples=args.samples, color=sys.stdout.isatty()))
        return 0
    if args.command == "chat":
        from .infer.chat import ChatSession, interactive

        session = ChatSession.load(args.model, args.adapter, system=args.system)
        if args.prompt is not None:
            print(session.ask(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature))
            return 0
        interactive(session, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        return 0
    if args.command == "demo":
        from .demo.run import run_demo

        run_demo(args.output_dir)
        return 0
    raise AssertionError(args.command)
