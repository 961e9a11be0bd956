"""Merge a LoRA into its base and prove the result: same logits, same prompts, same stop ids.

The merged folder is a plain transformers folder (safetensors shards, config, tokenizer with the
trained chat template, generation_config with every stop id) so transformers and vLLM load it as
is. The proofs reload that folder from disk with plain transformers, so they check what a user
will actually serve, not the object that happened to be in memory.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import run_folder
from ..data.conversation import Conversation, Message
from ..data.dataset import read_conversations
from ..data.encode import Encoder
from ..data.templates import with_run_defaults
from ..errors import TunelabError
from ..infer.load import load_inference, prompt_encoder, split_run_folder

log = logging.getLogger("tunelab")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest logit difference allowed, relative to the largest reference logit: what rounding the
# merged weights to the dtype can explain, far below what a wrong or missing merge produces.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

_PROBES = [
    [
        ("system", "You are a helpful assistant."),
        ("user", "Name three primary colours."),
        ("assistant", "Red, yellow and blue."),
    ],
    [
        ("user", "Translate 'good morning' into French."),
        ("assistant", "Bonjour."),
        ("user", "And into Chinese?"),
        ("assistant", "早上好。"),
    ],
]


@dataclass
class ExportReport:
    output_dir: str
    dtype: str
    verified: bool | None = None
    max_logit_diff: float | None = None
    tolerance: float | None = None
    top1_agreement: float | None = None
    prompts_identical: bool | None = None
    stop_ids: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def probe_conversations(adapter_dir: Path, n: int = 4) -> list[Conversation]:
    """A few records from the run's own training data when it is still there, else fixed probes."""
    cfg = run_folder.saved_config(adapter_dir)
    for spec in cfg.datasets if cfg else []:
        try:  # as the records are, without the run's defaults: the proofs render them the run's way
            convs = read_conversations(spec, cfg.dataset_format, cfg.columns, max_samples=n)
        except (TunelabError, OSError):
            continue
        if convs and all(c.text is None for c in convs):
            return convs
    return [Conversation([Message(r, c) for r, c in turns], source=f"probe {i}") for i, turns in enumerate(_PROBES)]


def _ids(encoder: Encoder, conv: Conversation, prompt_only: bool) -> list[int]:
    """The ids training saw for `conv`, or those inference feeds the model before its last answer."""
    if prompt_only:
        last = conv.assistant_indices[-1]
        return encoder.prompt_ids(Conversation(conv.messages[:last], tools=conv.tools, source=conv.source))
    return encoder.encode(conv).input_ids


@torch.no_grad()
def _logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([s], device=device)).logits[0].float().cpu() for s in sequences]


def _resolve_dtype(name: str, base_path: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    config = json.loads((Path(base_path) / "config.json").read_text())
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, saved, torch.float32) if saved in ("float32", "bfloat16", "float16") else torch.float32


def export_merged(
    model: str,
    adapter: str | None,
    output_dir: str,
    dtype: str = "auto",
    shard_size: str = "5GB",
    verify: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> ExportReport:
    """Merge on `device` (default the CPU: an fp32 merge of a 7B model needs 28 GiB, which host memory
    has and a GPU often has not), cast to `dtype`, write, then prove the folder."""
    if dtype not in ("auto", *DTYPES):
        raise TunelabError(f"--dtype: '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    base, adapters = split_run_folder(model, [adapter] if adapter else None)
    if len(adapters) != 1:
        raise TunelabError("export: give one LoRA adapter (--adapter DIR, or a LoRA run folder as --model)")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TunelabError(f"--output: '{out}' exists and is not empty; choose another folder or pass --overwrite")
    adapter_dir = Path(adapters[0])
    if Path(adapter_dir).resolve() == out.resolve():
        raise TunelabError("--output: must differ from the adapter folder")
    if device not in ("cpu", "cuda"):
        raise TunelabError(f"--device: '{device}' is not cpu or cuda")
    im = load_inference(
        model, [adapter] if adapter else None, dtype=torch.float32, device=device, trust_remote_code=trust_remote_code
    )
    trust = im.trust_remote_code
    variant = im.variants[0]
    if getattr(im.model.base_model.model, "is_quantized", False) or getattr(im.model, "is_loaded_in_4bit", False):
        raise TunelabError(f"export: the base '{base}' is quantized; merge into unquantized weights instead")
    target = _resolve_dtype(dtype, im.base_path)
    convs = probe_conversations(adapter_dir)
    encoder = prompt_encoder(variant, im.base_path)
    sequences = [_ids(encoder, c, prompt_only=False) for c in convs]
    reference = _logits(im.model, sequences) if verify else []

    log.info("merging %s into %s", adapter_dir, im.base_path)
    merged = im.model.merge_and_unload()
    merged.to(target)
    merged.generation_config.eos_token_id = variant.stop_ids or merged.generation_config.eos_token_id
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True)
    merged.save_pretrained(out, safe_serialization=True, max_shard_size=shard_size)
    # a plain folder has no run config: the trained system prompt and tools go into its template's defaults
    exported = copy.deepcopy(variant.tokenizer)
    exported.chat_template = with_run_defaults(exported.chat_template, **encoder.defaults)
    exported.save_pretrained(out)
    for extra in (run_folder.CONFIG, run_folder.SUMMARY):
        if (adapter_dir / extra).exists():
            shutil.copy(adapter_dir / extra, out / f"trained_{extra}")
    del merged, im
    report = ExportReport(str(out), str(target).replace("torch.", ""), stop_ids=list(variant.stop_ids))
    if verify:
        verify_export(out, encoder, convs, sequences, reference, report, trust)
    (out / run_folder.EXPORT_REPORT).write_text(
        json.dumps(asdict(report), indent=2, ensure_ascii=False), encoding="utf-8"
    )
    return report


def verify_folder(
    output_dir: str, model: str, adapter: str | None = None, trust_remote_code: bool = False
) -> ExportReport:
    """Re-check an exported folder against base + adapter, e.g. after copying it or editing its files."""
    _, adapters = split_run_folder(model, [adapter] if adapter else None)
    im = load_inference(
        model, [adapter] if adapter else None, dtype=torch.float32, device="cpu", trust_remote_code=trust_remote_code
    )
    trust = im.trust_remote_code
    variant = im.variants[0]
    convs = probe_conversations(Path(adapters[0]))
    encoder = prompt_encoder(variant, im.base_path)
    sequences = [_ids(encoder, c, prompt_only=False) for c in convs]
    reference = _logits(im.model, sequences)
    del im
    config = json.loads((Path(output_dir) / "config.json").read_text())
    report = ExportReport(
        str(output_dir), config.get("dtype") or config.get("torch_dtype") or "float32", stop_ids=list(variant.stop_ids)
    )
    return verify_export(Path(output_dir), encoder, convs, sequences, reference, report, trust)


def verify_export(
    out: Path,
    trained_enc: Encoder,
    convs: list[Conversation],
    sequences: list[list[int]],
    reference: list[torch.Tensor],
    report: ExportReport,
    trust_remote_code: bool = False,
) -> ExportReport:
    """Reload the folder with plain transformers and compare with base + adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dtype = getattr(torch, report.dtype)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    got = _logits(model, sequences)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, reference))
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    finite = all(bool(torch.isfinite(t).all()) for t in got + reference)
    agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(got, reference)]
    report.max_logit_diff = diff if finite else float("nan")
    report.tolerance = TOLERANCE[dtype] * scale
    report.top1_agreement = sum(agree) / len(agree)
    if not finite:
        report.problems.append("logits are not finite (NaN or inf): the adapter or the merged weights are corrupt")
    elif diff > report.tolerance:
        report.problems.append(
            f"merged logits differ from base + adapter by {diff:.3g} "
            f"(tolerance {report.tolerance:.3g} for {report.dtype})"
        )

    exported = AutoTokenizer.from_pretrained(out, trust_remote_code=trust_remote_code)
    exported_enc = Encoder(exported, cutoff_len=trained_enc.cutoff_len)  # a plain folder: its template alone
    report.prompts_identical = all(
        _ids(trained_enc, c, True) == _ids(exported_enc, c, True)
        and _ids(trained_enc, c, False) == _ids(exported_enc, c, False)
        for c in convs
    )
    if not report.prompts_identical:
        report.problems.append("the exported chat template renders prompts differently from training")
    saved = GenerationConfig.from_pretrained(out).eos_token_id
    saved = saved if isinstance(saved, list) else [saved]
    if sorted(saved) != sorted(report.stop_ids):
        report.problems.append(f"generation_config stop ids {saved} differ from training's {report.stop_ids}")
    report.verified = not report.problems
    return report
