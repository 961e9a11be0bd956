"""`tunelab train | data | chat | generate | eval | export | sweep | estimate | serve | demo`: argument parsing only.

Each command is one row of `COMMANDS`: a function that adds its arguments and one that calls the
Python API. The work is in the API, so a notebook gets the same behaviour.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import Interrupted, TunelabError
from .logs import setup_logging

# ---------------------------------------------------------------------------------------------- arguments


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own Python code when --model names a base that ships it (a run folder "
        "remembers its own setting)",
    )


def _train_args(p):
    _config_args(p)


def _data_args(p):
    _config_args(p)
    p.add_argument("--samples", type=int, default=3, help="rendered samples to show")
    p.add_argument("--jsonl", action="store_true", help="write {input_ids, labels} per sample to stdout instead")


def _chat_args(p):
    p.add_argument("--model", required=True, help="a model folder or a tunelab run folder")
    p.add_argument("--adapter", help="a LoRA adapter folder (a tunelab run folder)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    _agent_args(p)
    _trust_arg(p)


def _agent_args(p) -> None:
    p.add_argument("--tools", metavar="FILE.json", help="tool (function) definitions the template renders")
    think = p.add_mutually_exclusive_group()
    think.add_argument(
        "--think",
        dest="think",
        action="store_true",
        default=None,
        help="enable_thinking on, where the template has that switch",
    )
    think.add_argument("--no-think", dest="think", action="store_false", help="enable_thinking off")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model folder, a tunelab run folder, or a hub id")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="DIR",
        help="a LoRA adapter folder; repeat to compare several, 'none' for the base model",
    )
    p.add_argument("--dataset", required=True, help="records in any format tunelab trains on")
    p.add_argument("--dataset-format", default="auto")
    p.add_argument("--max-samples", type=int)
    p.add_argument("--system", help="system prompt added to records that have none")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    _agent_args(p)
    _trust_arg(p)


def _generate_args(p):
    _model_args(p)
    p.add_argument("--output", default="predictions.jsonl", help="JSON lines: prompt, reference, prediction(s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def _eval_args(p):
    _model_args(p)
    p.add_argument("--output-dir", help="write eval.csv, eval.json, eval.md and predictions.jsonl here")


def _export_args(p):
    p.add_argument("--model", required=True, help="the base model folder (or a LoRA run folder alone)")
    p.add_argument("--adapter", help="the LoRA run folder")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 (default: the base's dtype)")
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--no-verify", action="store_true", help="skip the logits / prompt / stop-id proofs")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where to merge (default cpu: an fp32 merge needs 4 bytes per parameter)",
    )
    _trust_arg(p)


def _sweep_args(p):
    p.add_argument("config")
    p.add_argument("grid", nargs="+", metavar="key=v1,v2")
    p.add_argument("--eval-dataset", help="held-out records every run is evaluated on (default: eval_dataset)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)


def _estimate_args(p):
    _config_args(p)
    p.add_argument("--device", choices=("cuda", "cpu"), help="estimate for this device (default: this machine's)")
    p.add_argument("--quant-bits", type=int, choices=(4, 8), help="a bitsandbytes-quantized base (QLoRA)")
    p.add_argument(
        "--gpu-mem",
        type=_memory_size,
        metavar="SIZE",
        help="a GPU's memory (e.g. 80GB, 24GiB): says which engine fits it and what auto picks",
    )


def _demo_args(p):
    p.add_argument(
        "--stage",
        choices=("sft", "dpo"),
        default="sft",
        help="sft: full fine-tuning then LoRA on a persona (default); dpo: SFT then DPO on a style preference, "
        "scored on held-out pairs (pref_accuracy before and after)",
    )
    p.add_argument("--output-dir", help="where the models go (default: demo_run, or demo_run/dpo for --stage dpo)")


# ---------------------------------------------------------------------------------------------- commands


def _train(args) -> int:
    from .config import load_config
    from .train.run import train

    train(load_config(args.config, args.overrides))  # it says where the run folder is, at the start and the end
    return 0


def _data(args) -> int:
    from .config import load_config
    from .data.report import data_report, write_jsonl

    cfg = load_config(args.config, args.overrides)
    if args.jsonl:
        write_jsonl(cfg, sys.stdout)
    else:
        print(data_report(cfg, n_samples=args.samples, color=sys.stdout.isatty()))
    return 0


def _chat(args) -> int:
    from .data.dataset import read_tools
    from .infer.chat import ChatSession, interactive, show
    from .infer.replies import parse_reply

    session = ChatSession.load(
        args.model,
        args.adapter,
        system=args.system,
        trust_remote_code=args.trust_remote_code,
        tools=read_tools(args.tools),
        think=args.think,
    )
    if args.prompt is not None:
        print(
            show(
                parse_reply(session.ask(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature))
            )
        )
        return 0
    interactive(session, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def _cases_and_model(args):
    from .infer.generate import read_cases
    from .infer.load import load_inference

    for flag in ("max_new_tokens", "batch_size"):
        if getattr(args, flag) <= 0:
            raise TunelabError(f"--{flag.replace('_', '-')}: {getattr(args, flag)} must be greater than 0")
    cases = read_cases(
        args.dataset, args.dataset_format, system=args.system, max_samples=args.max_samples, tools=args.tools
    )
    return cases, load_inference(args.model, args.adapter, trust_remote_code=args.trust_remote_code)


def _generate(args) -> int:
    from .infer.generate import run_generate, write_predictions

    cases, im = _cases_and_model(args)
    run_generate(
        im,
        cases,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        think=args.think,
    )
    write_predictions(cases, [v.label for v in im.variants], args.output)
    print(f"wrote {len(cases)} predictions to {args.output}")
    return 0


def _eval(args) -> int:
    from .eval.evaluate import COLUMNS, UNITS, evaluate, markdown_table, write_table
    from .eval.preference import COLUMNS as PREF_COLUMNS
    from .eval.preference import UNITS as PREF_UNITS
    from .eval.preference import evaluate_preferences, is_preference_data, read_pairs
    from .infer.generate import write_predictions
    from .infer.load import load_inference

    if is_preference_data(args.dataset):  # pairs: which answer each model prefers, no generation
        records = read_pairs(args.dataset, args.system, args.max_samples, args.tools)
        im = load_inference(args.model, args.adapter, trust_remote_code=args.trust_remote_code)
        rows = evaluate_preferences(im, records, batch_size=args.batch_size)
        print(markdown_table(rows, PREF_COLUMNS) + "\n\n" + PREF_UNITS)
        if args.output_dir:
            write_table(rows, args.output_dir, "eval", PREF_COLUMNS, PREF_UNITS)
        return 0
    cases, im = _cases_and_model(args)
    rows = evaluate(im, cases, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(markdown_table(rows, COLUMNS) + "\n\n" + UNITS)
    if args.output_dir:
        write_table(rows, args.output_dir, "eval", COLUMNS, UNITS)
        write_predictions(cases, [v.label for v in im.variants], f"{args.output_dir}/predictions.jsonl")
    return 0


def _export(args) -> int:
    from .export.merge import export_merged

    report = export_merged(
        args.model,
        args.adapter,
        args.output,
        args.dtype,
        args.shard_size,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
    )
    print(f"merged model written to {report.output_dir} ({report.dtype})")
    if report.verified is None:
        return 0
    print(
        f"logits vs base + adapter: max |diff| {report.max_logit_diff:.3g} (tolerance {report.tolerance:.3g}), "
        f"top-1 agreement {100 * report.top1_agreement:.1f}%"
    )
    print(
        f"prompts rendered from the exported template: {'identical' if report.prompts_identical else 'DIFFERENT'}"
        f"; stop ids {report.stop_ids}"
    )
    if not report.verified:
        raise TunelabError("export verification failed: " + "; ".join(report.problems))
    print("verified")
    return 0


def _sweep(args) -> int:
    from .eval.evaluate import markdown_table
    from .sweep import run_sweep

    rows = run_sweep(args.config, args.grid, args.eval_dataset, args.max_new_tokens, args.batch_size)
    print(markdown_table(rows))
    return 0


def _memory_size(text: str) -> int:
    """'80GB' (10**9), '80GiB' (2**30) or a plain number of GB; GPU makers count in GB."""
    import re

    found = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|G)?\s*", text, re.IGNORECASE)
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 80GB or 24GiB")
    unit = 2**30 if (found.group(2) or "").lower() == "gib" else 10**9
    return int(float(found.group(1)) * unit)


def _estimate(args) -> int:
    from .config import load_config
    from .model.estimate import estimate_memory, format_estimate
    from .train.engines import format_plan
    from .train.launch import processes_per_node

    cfg = load_config(args.config, args.overrides)
    print(format_estimate(estimate_memory(cfg, device=args.device, quant_bits=args.quant_bits)))
    world = processes_per_node(cfg) * cfg.nnodes  # as many as training would start
    if args.device != "cpu" and (world > 1 or args.gpu_mem or cfg.distributed != "auto"):
        print()
        print(format_plan(cfg, world, args.gpu_mem))
    return 0


def _demo(args) -> int:
    if args.stage == "dpo":
        from .demo.dpo import run_dpo_demo

        run_dpo_demo(args.output_dir or "demo_run/dpo")
        return 0
    from .demo.run import run_demo

    run_demo(args.output_dir or "demo_run")
    return 0


def _keys_epilog() -> str:
    from .config import keys_help

    return "config keys (YAML, or key=value after CONFIG):\n" + keys_help()


def _serve_args(p):
    p.add_argument(
        "--model", required=True, help="a base model, a full fine-tune, or a LoRA run folder; served under this name"
    )
    p.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="a LoRA run folder served as model NAME; repeat for several, switched per request",
    )
    p.add_argument("--served-model-name", help="the id the base model is served under (default: --model as given)")
    p.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", help="the key requests must send (Authorization: Bearer KEY), read from a file")
    key.add_argument("--api-key", help="the key on the command line (other users can read it; prefer TUNELAB_API_KEY)")
    key.add_argument("--no-api-key", action="store_true", help="no key at all (loopback host only, not with --ui)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME", help="another Host name to answer")
    p.add_argument("--max-batch", type=int, default=32, help="requests that share one forward pass at most")
    p.add_argument("--max-queue", type=int, default=256, help="completions waiting at most; more are answered 429")
    p.add_argument("--max-tokens", type=int, default=4096, help="the most new tokens one completion may ask for")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024, help="the largest request body")
    p.add_argument("--docs", action="store_true", help="also serve the OpenAPI schema at /openapi.json")
    p.add_argument(
        "--check",
        metavar="DATASET",
        help="instead of serving: send DATASET's prompts to the server at "
        "--url and prove it serves what was trained (the run: --model, or the one --adapter)",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the OpenAI-compatible server --check asks")
    p.add_argument(
        "--backend",
        choices=("tunelab", "vllm"),
        default="tunelab",
        help="vllm: run vLLM with the same adapters, template and stop ids (a GPU machine with vLLM)",
    )
    p.add_argument("--print-vllm", action="store_true", help="print that vLLM command and exit")
    p.add_argument("--ui", action="store_true", help="also serve the web page at / : chat side by side and runs")
    p.add_argument("--runs", default=".", help="the folder whose run folders the web page shows and trains into")
    p.add_argument("--allow-training", action="store_true", help="let the web page start training runs under --runs")
    p.add_argument("--allow-hub", action="store_true", help="let page-started runs download models and datasets")
    p.add_argument("--max-jobs", type=int, default=1, help="training runs the page may have running at once")
    p.add_argument("--max-samples", type=int, help="--check only the first N records")
    _trust_arg(p)


def _serve(args) -> int:
    if args.check:
        return _serve_check(args)
    if args.print_vllm or args.backend == "vllm":
        import os
        import shutil

        from .serve.vllm import printable, vllm_command

        cmd = vllm_command(args.model, args.adapter, args.host, args.port, args.api_key)
        if args.print_vllm:
            print(printable(cmd))
            return 0
        if shutil.which("vllm") is None:
            raise TunelabError(
                "--backend vllm: no `vllm` command here (pip install vllm on a GPU machine); "
                "--print-vllm shows the command to run there"
            )
        os.execvp(cmd[0], cmd)
    for flag in ("max_batch", "max_queue", "max_tokens", "max_request_bytes", "max_jobs"):
        if getattr(args, flag) <= 0:
            raise TunelabError(f"--{flag.replace('_', '-')}: {getattr(args, flag)} must be greater than 0")
    try:
        from .serve.run import ServeOptions, serve
    except ImportError as exc:
        raise TunelabError(
            f"serving needs FastAPI and uvicorn ({exc.name} is missing): pip install 'tunelab[serve]'"
        ) from None
    options = ServeOptions(
        **{k: getattr(args, k) for k in ServeOptions.__dataclass_fields__ if k not in ("allowed_hosts", "ui_runs")},
        allowed_hosts=args.allowed_host,
        ui_runs=args.runs if args.ui else None,
    )
    serve(args.model, args.adapter, options, args.trust_remote_code)
    return 0


def _serve_check(args) -> int:
    from .serve.check import check, report
    from .serve.names import parse_adapters

    named = parse_adapters(args.adapter)
    if len(named) > 1:
        raise TunelabError("--check: one model at a time; give one --adapter NAME=DIR, or none for --model")
    model_id, folder = next(iter(named.items())) if named else (args.model, args.model)
    from .serve.guard import resolve_api_key

    key, _ = resolve_api_key(args.api_key, args.api_key_file, need_one=False)
    text, passed = report(check(args.url, model_id, folder, args.check, key, max_samples=args.max_samples))
    print(text)
    return 0 if passed else 1


# name -> (help, add arguments, run, epilog or None)
COMMANDS: dict[str, tuple[str, Callable, Callable[..., int], Callable[[], str] | None]] = {
    "train": ("fine-tune as CONFIG.yaml says (key=value overrides win)", _train_args, _train, _keys_epilog),
    "data": ("report on the data a config would train on", _data_args, _data, None),
    "chat": ("talk to a base model, a fine-tuned folder, or base + adapter", _chat_args, _chat, None),
    "generate": ("batched predictions for every record of a dataset", _generate_args, _generate, None),
    "eval": ("held-out loss, perplexity and generation metrics; a table per model", _eval_args, _eval, None),
    "export": ("merge a LoRA into its base: a plain transformers/vLLM folder, verified", _export_args, _export, None),
    "sweep": ("train a grid of runs (key=v1,v2 ...), evaluate each, compare in sweep.md", _sweep_args, _sweep, None),
    "estimate": ("parameters and per-GPU memory of a config, from config.json alone", _estimate_args, _estimate, None),
    "serve": ("the OpenAI API (chat, completions, models) over a base and its adapters", _serve_args, _serve, None),
    "demo": (
        "build a tiny model, fine-tune it on the persona data (or --stage dpo: teach it a preference), and chat",
        _demo_args,
        _demo,
        None,
    ),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune open LLMs from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _, epilog) in COMMANDS.items():
        add_args(
            sub.add_parser(
                name,
                help=help_text,
                description=help_text,
                epilog=epilog() if epilog else None,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        return COMMANDS[args.command][2](args)
    except Interrupted as exc:
        print(f"tunelab: {exc}", file=sys.stderr)
        return 130
    except TunelabError as exc:
        print(f"tunelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130
