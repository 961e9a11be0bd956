"""`tunelab serve --check DATASET`: proof that a running server serves what was trained.

Any OpenAI-compatible URL (tunelab's own server, or vLLM with the adapters handed off) gets each
record's prompt; per record the check reports whether the prompt tokens it served equal training's
(the ids when the server returns them with `return_token_ids`, as tunelab and vLLM do; else their
count), whether the answer ended on a stop id rather than at `max_tokens`, and whether it equals the
reference. A mismatched prompt or an answer that never stopped fails the check.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import run_folder
from ..data.dataset import config_encoder
from ..data.encode import Encoder
from ..errors import TunelabError
from ..infer.generate import read_cases
from ..infer.load import tokenizer_for


@dataclass
class Checked:
    source: str
    prompt_tokens: int
    served_tokens: int | None
    same_prompt: bool
    stopped: bool
    exact: bool


def _post(url: str, body: dict, api_key: str | None) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise TunelabError(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}") from None
    except urllib.error.URLError as exc:
        raise TunelabError(f"{url}: no server answers ({exc.reason})") from None


def trained_encoder(folder: str) -> Encoder:
    """The encoder training used for the run in `folder` (its saved tokenizer, template, system prompt, tools
    and reasoning rule)."""
    path = Path(folder)
    base = run_folder.adapter_base(path) or folder
    cfg = run_folder.saved_config(path)
    tokenizer = tokenizer_for(path, base, bool(cfg and cfg.trust_remote_code))
    return config_encoder(cfg, tokenizer)


def check(
    url: str,
    model_id: str,
    run_folder: str,
    dataset: str,
    api_key: str | None = None,
    max_tokens: int = 256,
    max_samples: int | None = None,
) -> list[Checked]:
    encoder = trained_encoder(run_folder)
    endpoint = url.rstrip("/") + "/chat/completions"
    rows = []
    for case in read_cases(dataset, max_samples=max_samples):
        trained = encoder.prompt_ids(case.prompt)
        reply = _post(
            endpoint,
            {
                "model": model_id,
                "messages": case.prompt.template_messages(),
                "tools": case.prompt.tools,
                "temperature": 0,
                "max_tokens": max_tokens,
                "return_token_ids": True,
            },
            api_key,
        )
        served = reply.get("prompt_token_ids")
        count = (reply.get("usage") or {}).get("prompt_tokens")
        same = served == trained if served is not None else count == len(trained)
        choice = reply["choices"][0]
        text = choice["message"].get("content") or ""
        rows.append(
            Checked(
                case.source,
                len(trained),
                len(served) if served is not None else count,
                same,
                choice.get("finish_reason") in ("stop", "tool_calls"),
                text.strip() == case.reference.strip(),
            )
        )
    return rows


def report(rows: list[Checked]) -> tuple[str, bool]:
    """The lines to print, and whether the check passed."""
    bad = [r for r in rows if not (r.same_prompt and r.stopped)]
    lines = [
        f"{len(rows)} records: prompt tokens equal to training's: {sum(r.same_prompt for r in rows)}; "
        f"stopped on a stop id: {sum(r.stopped for r in rows)}; exact match: "
        f"{sum(r.exact for r in rows) / max(len(rows), 1):.1%}"
    ]
    for r in bad[:20]:
        why = (
            []
            if r.same_prompt
            else [
                f"served {r.served_tokens} prompt tokens, trained {r.prompt_tokens}"
                if r.served_tokens != r.prompt_tokens
                else "prompt tokens differ"
            ]
        )
        why += [] if r.stopped else ["ran to max_tokens without a stop id"]
        lines.append(f"  {r.source}: {'; '.join(why)}")
    lines.append("check passed" if not bad else f"check FAILED: {len(bad)} of {len(rows)} records")
    return "\n".join(lines), not bad
