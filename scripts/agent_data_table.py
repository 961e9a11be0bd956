"""Which real templates train which data, and at what cost: one markdown table per shared dataset.

For every tokenizer under ../shared/tokenizers and every `reasoning` rule, the tool-call and reasoning
sets under ../shared/datasets/llama-factory (records a template cannot take are skipped and counted)
are encoded; each cell gives the samples, how many of them are turns trained apart, the turns whose
reasoning the template cannot show, and the tokens. A plain two-turn chat shows whether the template
trains directly (one sample) or expanded.

    python scripts/agent_data_table.py
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunelab.data.conversation import Conversation, Message  # noqa: E402
from tunelab.data.dataset import read_conversations  # noqa: E402
from tunelab.data.encode import Encoder  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402

_spec = importlib.util.spec_from_file_location("real_tokenizers", ROOT / "tests" / "support" / "real_tokenizers.py")
real_tokenizers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_tokenizers)

SETS = ("glaive_toolcall_en_demo.json", "glaive_toolcall_zh_demo.json", "reason_tool_use_demo_50.jsonl")
SHARED = ROOT.parent / "shared" / "datasets" / "llama-factory"
CHAT = Conversation(
    [
        Message("system", "Be brief."),
        Message("user", "A colour?"),
        Message("assistant", "Blue."),
        Message("user", "A number?"),
        Message("assistant", "Seven."),
    ],
    source="chat",
)


def reason(message: str) -> str:
    """A refusal in a few words: tunelab's own check, or the template's raise_exception text."""
    if "does not render tools" in message:
        return "template has no tools"
    if "does not render the tool calls" in message:
        return "template has no tool calls"
    if "refused this conversation (" in message:
        return "template: " + message.split("refused this conversation (", 1)[1].rstrip(")")[:48]
    return message.split(": ", 1)[-1][:60]


def cell(encoder: Encoder, convs: list[Conversation]) -> str:
    samples, refused, first = [], 0, ""
    for conv in convs:
        try:
            samples += encoder.samples(conv)
        except TunelabError as exc:
            refused += 1
            first = first or reason(str(exc))
    own = sum(s.own_turn for s in samples)
    lost = sum(s.reasoning_lost for s in samples)
    text = f"{len(samples)} samples, {own} apart, {lost} lost, {sum(len(s.input_ids) for s in samples)} tokens"
    return text + (f"; {refused} refused ({first})" if refused else "")


def main() -> int:
    work = Path(tempfile.mkdtemp())
    families = [f for f in real_tokenizers.ALL if real_tokenizers.available(f)]
    data = {name: read_conversations(str(SHARED / name), skip_bad=True) for name in SETS if (SHARED / name).exists()}
    print("| template | plain 2-turn chat (keep) | reasoning shown |")
    print("|---|---|---|")
    tokenizers = {}
    for family in families:
        tok = tokenizers[family] = real_tokenizers.load(family, work)
        encoder = Encoder(tok)
        n = len(encoder.samples(CHAT))
        print(f"| {family} | {'directly' if n == 1 else f'expanded: {n} samples'} | {encoder.reasoning_mode} |")
    for name, convs in data.items():
        print(f"\n{name}: {len(convs)} records read\n")
        print("| template | keep | last | drop |\n|---|---|---|---|")
        for family in families:
            row = [cell(Encoder(tokenizers[family], reasoning=rule), convs) for rule in ("keep", "last", "drop")]
            print(f"| {family} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
