"""Conversation -> (input_ids, labels): the one place that decides which tokens are trained.

Training ids are inference ids: the whole conversation is rendered with the chat template and
tokenized in one piece, as `apply_chat_template` followed by the tokenizer would, and the labels are
laid on those tokens by their character offsets. The one departure is that text inside messages is
plain text (see `literal`): a `<|im_end|>` typed into a message is the tokens of its characters.

The trained characters of an assistant turn are its content plus the end-of-turn token(s) after it,
for any Jinja chat template. The turn is located by rendering: the prompt for turn i (messages
before it, with the generation prompt) must be a prefix of the whole rendered conversation, and the
content follows where the template puts an answer. A template that is not prefix-stable cannot be
split into turns, so it fails with the sample named instead of guessing.

A token is trained when it starts inside an answer span. Where a boundary falls inside a token, the
token goes to the side it starts on, with one exception: a plain-text token that starts in the
prompt and runs into the answer (a template whose prompt ends in text that merges with the answer's
first characters, like `A: ` + `Seven` -> ` Seven`) is trained, since it carries the answer's text.
A control token (`<|assistant|>\\n` swallowing the answer's leading whitespace) never is.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import re
from dataclasses import dataclass

from ..constants import IGNORE_INDEX
from ..errors import TunelabError
from .conversation import Conversation
from .literal import PlainTextEncoder, Shield, SpecialText

# Part of the tokenization cache key: bump it whenever the same inputs would encode differently.
ENCODING_VERSION = 2
_PROBE = "tunelab-probe-answer"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: str = ""
    literal_text: bool = False  # the record's text held special-token text, encoded as plain text

    @property
    def n_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class _Plan:
    text: str
    spans: list[tuple[int, int]] | None  # trained character spans; None = every token
    raw: bool = False  # plain text for continued pre-training: no template, eos appended
    protected: list[tuple[int, int]] | None = None  # characters that came from messages holding special text


def special_tokens(tokenizer) -> list[str]:
    found = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            found.add(tok.content)
    return sorted((t for t in found if t), key=len, reverse=True)


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The special tokens a template puts right after an assistant answer, plus eos.

    Found by rendering a probe conversation, so it works for templates we have never seen
    (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, `<|end|>`, eos ...).
    """
    found: list[str] = []
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False
        )
    except Exception:
        text = ""
    at = text.find(_PROBE)
    if at >= 0:
        rest = text[at + len(_PROBE):]
        specials = special_tokens(tokenizer)
        while True:
            hit = next((s for s in specials if rest.startswith(s)), None)
            if hit is None:
                break
            if hit not in found:
                found.append(hit)
            rest = rest[len(hit):]
    if tokenizer.eos_token and tokenizer.eos_token not in found:
        found.append(tokenizer.eos_token)
    return found


class Encoder:
    """Renders and tokenizes conversations for one tokenizer (whose chat_template is already set).

    Training, eval, chat, generate and the export proofs all encode through here, so a prompt served
    later is token for token the prompt that was trained.
    """

    def __init__(self, tokenizer, train_on: str = "assistant", cutoff_len: int | None = None):
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.cutoff_len = cutoff_len
        self.eot_tokens = end_of_turn_tokens(tokenizer) if getattr(tokenizer, "chat_template", None) else (
            [tokenizer.eos_token] if tokenizer.eos_token else [])
        self.eot_ids = [tokenizer.convert_tokens_to_ids(t) for t in self.eot_tokens]
        self._eot_re = re.compile("(?:" + "|".join(map(re.escape, self.eot_tokens)) + ")+") if self.eot_tokens else None
        self._special_text = SpecialText(special_tokens(tokenizer))
        self._backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self._plain: PlainTextEncoder | None = None
        self._markup_ids = set(getattr(tokenizer, "added_tokens_decoder", {}))

    # ------------------------------------------------------------------ rendering

    def render(self, conv: Conversation, messages=None, add_generation_prompt: bool = False, tools=None) -> str:
        """The template's text for `conv` (or `messages`), exactly as `apply_chat_template` renders it."""
        try:
            return self.tokenizer.apply_chat_template(
                conv.template_messages() if messages is None else messages,
                tools=conv.tools if tools is None else tools, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja raise_exception() and template bugs alike
            raise TunelabError(f"{conv.source}: the chat template refused this conversation ({exc})") from None

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """The ids inference feeds the model for `conv` (which ends before the answer to generate)."""
        shield, messages, tools = self._shielded(conv)
        text = self.render(conv, messages, add_generation_prompt=True, tools=tools)
        text, _, protected = shield.unwrap(text, None, conv.source)
        ids, _ = self._tokenize([_Plan(text, None, protected=protected)])[0]
        return ids if ids is not None else self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ encoding

    def encode(self, conv: Conversation) -> Encoded:
        return self.encode_many([conv])[0]

    def encode_many(self, convs: list[Conversation]) -> list[Encoded]:
        """Encode a batch: templates render one by one, then a single tokenizer call covers every text.

        The batched call lets a fast tokenizer spread the work over its threads; each conversation's
        tokens are those of its whole text, so the batch equals encoding one at a time.
        """
        with _gc_paused():  # a few objects per token, all kept: each collection they set off walks the whole heap
            plans = [self._plan(conv) for conv in convs]
            tokenized = self._tokenize(plans)
            return [self._finish(conv, plan, ids, offsets) for conv, plan, (ids, offsets) in zip(convs, plans, tokenized)]

    def _plan(self, conv: Conversation) -> _Plan:
        if conv.text is not None:
            self._check_text(conv.text, conv.source, "field 'text'")
            # pre-training text is data through and through: any special-token text in it is plain text
            return _Plan(conv.text, None, raw=True, protected=[(0, len(conv.text))])
        shield, messages, tools = self._shielded(conv)
        full = self.render(conv, messages, tools=tools)
        if self.train_on == "all":
            text, _, protected = shield.unwrap(full, None, conv.source)
            return _Plan(text, None, protected=protected)
        turns = conv.assistant_indices
        if self.train_on == "last":
            turns = turns[-1:]
        spans = [self._answer_span(conv, messages, tools, full, i) for i in turns]
        for (_, e0), (s1, _) in zip(spans, spans[1:]):
            if s1 < e0:
                raise TunelabError(f"{conv.source}: assistant turns overlap in the rendered text")
        text, spans, protected = shield.unwrap(full, spans, conv.source)
        return _Plan(text, spans, protected=protected)

    def _shielded(self, conv: Conversation):
        """(shield, messages, tools): the conversation's strings checked, special-token text swapped for sentinels."""
        messages = conv.template_messages()
        for i, message in enumerate(messages):
            self._check_text(message, conv.source, f"message {i} ({message['role']})")
        self._check_text(conv.tools, conv.source, "tools")
        shield = Shield(self._special_text)
        return shield, shield.wrap(messages), shield.wrap(conv.tools)

    def _check_text(self, value, source: str, field: str) -> None:
        """Refuse text that no tokenizer can read as written: a lone surrogate from a JSON escape."""
        stack = [value]
        while stack:  # iterative: tool calls may nest deeper than Python's recursion limit
            item = stack.pop()
            if isinstance(item, dict):
                stack += [*item.keys(), *item.values()]
            elif isinstance(item, (list, tuple)):
                stack += item
            elif isinstance(item, str) and (bad := _SURROGATE.search(item)) is not None:
                raise TunelabError(f"{source}: {field} holds a lone surrogate U+{ord(bad.group()):04X} "
                                   "(from a JSON \\u escape?); expected valid Unicode text")

    def _answer_span(self, conv: Conversation, messages: list[dict], tools, full: str, i: int) -> tuple[int, int]:
        prompt = self.render(conv, messages[:i], add_generation_prompt=True, tools=tools)
        if not full.startswith(prompt):
            raise TunelabError(
                f"{conv.source}: the chat template does not render turn by turn (the prompt of assistant "
                f"message {i} is not a prefix of the whole conversation), so its answer tokens cannot be "
                "told apart; use a built-in template (template: chatml, llama3, gemma, alpaca, dolly)"
            )
        # Where the template puts an answer: found with a probe answer, so that text equal to the answer
        # elsewhere (a later user message, a template's reasoning block) is never taken for it.
        probe = [dict(m, content=_PROBE) if j == i else m for j, m in enumerate(messages)]
        at = self.render(conv, probe, tools=tools).find(_PROBE, len(prompt))
        content = messages[i]["content"]
        # the content as written, or as templates that trim render it
        rendered = [c for c in dict.fromkeys((content, content.lstrip(), content.rstrip(), content.strip()))
                    if at >= 0 and full.startswith(c, at)]
        if not rendered:
            raise TunelabError(f"{conv.source}: the template did not render the content of assistant message {i} "
                               "where it puts an answer")
        ends = [at + len(c) for c in rendered]
        if self._eot_re is not None:  # prefer the reading that the end-of-turn token(s) follow
            ends = [e for e in ends if self._eot_re.match(full, e)] or ends
            match = self._eot_re.match(full, ends[0])
            if match:
                return at, match.end()
        return at, ends[0]

    def _tokenize(self, plans: list[_Plan]) -> list[tuple[list[int], list | None]]:
        """(ids, character offsets) per plan, from one call to the fast tokenizer's backend.

        The backend is called directly: transformers' wrapper gives the same ids but spends as long
        again turning them into Python lists. A tokenizer without a backend (a slow, pure-Python one)
        has no offsets; its texts are tokenized between span edges instead (see `_by_segment`).
        """
        if not plans:
            return []
        if self._backend is None:
            return [(None, None)] * len(plans)
        out = [(e.ids, e.offsets) for e in self._backend.encode_batch([p.text for p in plans], add_special_tokens=False)]
        for k, plan in enumerate(plans):
            if plan.protected:
                self._plain = self._plain or PlainTextEncoder(self.tokenizer)
                out[k] = self._plain.fix(plan.text, *out[k], plan.protected)
        return out

    def _finish(self, conv: Conversation, plan: _Plan, ids, offsets) -> Encoded:
        if ids is None:
            ids, labels = self._by_segment(plan)
        elif plan.spans is None:
            labels = list(ids)
        else:
            labels = self._labels(ids, offsets, plan.spans)
        if plan.raw:
            ids, labels = self._wrap_text(ids, labels)
        truncated = self.cutoff_len is not None and len(ids) > self.cutoff_len
        if truncated:
            ids, labels = ids[: self.cutoff_len], labels[: self.cutoff_len]
        literal = bool(plan.protected) and not plan.raw
        return Encoded(ids, labels, truncated, conv.source, literal)

    def _labels(self, ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
        """A token is trained when it starts inside a span, or is plain text running into one (module doc)."""
        labels = [IGNORE_INDEX] * len(ids)
        starts = [a for a, _ in offsets]
        for a, b in spans:
            i, j = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
            if i and offsets[i - 1][1] > a and ids[i - 1] not in self._markup_ids:
                i -= 1
            labels[i:j] = ids[i:j]
        return labels

    def _by_segment(self, plan: _Plan) -> tuple[list[int], list[int]]:
        """Without offsets: the pieces between span edges are tokenized apart (slow tokenizers only)."""
        spans = plan.spans or []
        cuts = [0] + sorted({b for span in spans for b in span}) + [len(plan.text)]
        ids: list[int] = []
        labels: list[int] = []
        for a, b in zip(cuts, cuts[1:]):
            if a == b:
                continue
            seg = self.tokenizer(plan.text[a:b], add_special_tokens=False)["input_ids"]
            trained = plan.spans is None or any(s <= a and b <= e for s, e in spans)
            ids += seg
            labels += seg if trained else [IGNORE_INDEX] * len(seg)
        return ids, labels

    def _wrap_text(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            ids, labels = [tok.bos_token_id] + ids, [tok.bos_token_id] + labels
        if tok.eos_token_id is not None:
            ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
        return ids, labels

    def ends_with_eot(self, sample: Encoded) -> bool:
        trained = [x for x in sample.labels if x != IGNORE_INDEX]
        return bool(trained) and trained[-1] in self.eot_ids


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
