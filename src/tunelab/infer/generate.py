"""Batched generation over a dataset: the last assistant turn of each record is its reference.

Prompts render through the same `Encoder.render` training used, with the template saved beside
the weights, so a prediction is what the trained model says to exactly the prompt it learned from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.conversation import Conversation
from ..data.dataset import read_conversations, read_tools
from ..errors import TunelabError
from .load import InferenceModel, Variant, prompt_encoder, thinking_switch
from .replies import parse_reply


@dataclass
class Case:
    """One record split into what the model sees and what it should say."""

    conversation: Conversation
    prompt: Conversation
    reference: str
    source: str
    predictions: dict = field(default_factory=dict)  # label -> text
    stopped: dict = field(default_factory=dict)  # label -> ended on a stop id before max_new_tokens
    new_tokens: dict = field(default_factory=dict)
    replies: dict = field(default_factory=dict)  # label -> the prediction's reasoning and tool calls, where any


def read_cases(
    path: str,
    dataset_format: str = "auto",
    columns: dict | None = None,
    system: str | None = None,
    max_samples: int | None = None,
    tools: str | None = None,
) -> list[Case]:
    """`tools`: a JSON file of tool definitions for records that carry none of their own."""
    conversations = read_conversations(
        path, dataset_format, columns, system, max_samples=max_samples, tools=read_tools(tools)
    )
    if not conversations:
        raise TunelabError(f"{path}: the dataset is empty")
    if any(conv.text is not None for conv in conversations):
        raise TunelabError(f"{path}: plain text records have no prompt and reference; use a chat or instruction format")
    cases = []
    for conv in conversations:
        last = conv.assistant_indices[-1]
        prompt = Conversation(conv.messages[:last], tools=conv.tools, source=conv.source)
        cases.append(Case(conv, prompt, conv.messages[last].content, conv.source))
    return cases


def _batches(order: list[int], size: int):
    for i in range(0, len(order), size):
        yield order[i : i + size]


def generate_cases(
    im: InferenceModel,
    variant: Variant,
    cases: list[Case],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 8,
    progress: bool = True,
    think: bool | None = None,
) -> None:
    """Fill `case.predictions[variant.label]`; prompts are left-padded and batched by length.

    think: `enable_thinking` for templates with that switch; None keeps what training did."""
    tok = variant.tokenizer
    encoder = prompt_encoder(variant, im.base_path)
    switch = thinking_switch(tok, think)
    prompts = [encoder.prompt_ids(c.prompt, **switch) for c in cases]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (variant.stop_ids or [0])[0]
    stops = set(variant.stop_ids)
    order = sorted(range(len(cases)), key=lambda i: -len(prompts[i]))
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=variant.stop_ids or None,
        pad_token_id=pad,
        do_sample=temperature > 0,
    )
    kwargs.update(temperature=temperature) if temperature > 0 else kwargs.update(
        temperature=None, top_p=None, top_k=None
    )
    bar = tqdm(total=len(cases), desc=f"generate {variant.label}", disable=not progress, unit="sample")
    with im.use(variant) as model, torch.no_grad():
        for batch in _batches(order, batch_size):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            out = model.generate(input_ids=ids.to(im.device), attention_mask=mask.to(im.device), **kwargs)
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), None)
                case = cases[i]
                case.stopped[variant.label] = cut is not None
                case.new_tokens[variant.label] = len(new) if cut is None else cut + 1
                text = tok.decode(new[:cut], skip_special_tokens=True)
                reply = parse_reply(text)
                case.predictions[variant.label] = reply.content if (reply.reasoning or reply.tool_calls) else text
                if reply.reasoning is not None or reply.tool_calls:
                    case.replies[variant.label] = {
                        k: v for k, v in (("reasoning", reply.reasoning), ("tool_calls", reply.tool_calls)) if v
                    }
            bar.update(len(batch))
    bar.close()


def run_generate(im: InferenceModel, cases: list[Case], **kwargs) -> list[Case]:
    for variant in im.variants:
        generate_cases(im, variant, cases, **kwargs)
    return cases


def case_record(case: Case, labels: list[str]) -> dict:
    row = {"source": case.source, "prompt": case.prompt.template_messages(), "reference": case.reference}
    if len(labels) == 1:
        row.update(prediction=case.predictions[labels[0]], stopped=case.stopped[labels[0]])
        row.update(case.replies.get(labels[0], {}))
    else:
        row.update(predictions={k: case.predictions[k] for k in labels}, stopped={k: case.stopped[k] for k in labels})
        if case.replies:
            row["replies"] = case.replies
    return row


def write_predictions(cases: list[Case], labels: list[str], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for case in cases:
            f.write(json.dumps(case_record(case, labels), ensure_ascii=False) + "\n")
