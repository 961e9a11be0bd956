"""Conversation -> (input_ids, labels): the one place that decides which tokens are trained.

Training ids are inference ids: the whole conversation is rendered with the chat template and
tokenized in one piece, as `apply_chat_template` followed by the tokenizer would, and the labels are
laid on those tokens by their character offsets. The one departure is that text inside messages is
plain text (see `literal`): a `<|im_end|>` typed into a message is the tokens of its characters.

Which characters are an assistant turn's answer, for any Jinja chat template, is decided by rendering
(see `turns`); a turn the whole rendering cannot hold as inference renders it becomes a sample of its
own. Reasoning is kept per the `reasoning` rule (see `reasoning`).

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
from . import reasoning as thinking
from .conversation import Conversation
from .literal import PlainTextEncoder, Shield, SpecialText
from .tools import arguments_as_text, with_text_arguments
from .turns import TurnLocator

# Part of the tokenization cache key: bump it whenever the same inputs would encode differently.
ENCODING_VERSION = 4
_PROBE = "tunelab-probe-answer"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: str = ""
    literal_text: bool = False  # the record's text held special-token text, encoded as plain text
    own_turn: bool = False  # one turn of a conversation, in a sample of its own (see `turns`)
    reasoning_lost: int = 0  # turns whose reasoning the template could not show
    turn: int = -1  # the message index of an own turn's answer

    @property
    def n_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class _Plan:
    text: str
    spans: list[tuple[int, int]] | None  # trained character spans; None = every token
    raw: bool = False  # plain text for continued pre-training: no template, eos appended
    protected: list[tuple[int, int]] | None = None  # characters that came from messages holding special text
    source: str = ""
    own_turn: bool = False
    reasoning_lost: int = 0
    turn: int = -1


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
        rest = text[at + len(_PROBE) :]
        specials = special_tokens(tokenizer)
        while True:
            hit = next((s for s in specials if rest.startswith(s)), None)
            if hit is None:
                break
            if hit not in found:
                found.append(hit)
            rest = rest[len(hit) :]
    if tokenizer.eos_token and tokenizer.eos_token not in found:
        found.append(tokenizer.eos_token)
    return found


class Encoder:
    """Renders and tokenizes conversations for one tokenizer (whose chat_template is already set).

    Training, eval, chat, generate and the export proofs all encode through here, so a prompt served
    later is token for token the prompt that was trained.
    """

    def __init__(
        self,
        tokenizer,
        train_on: str = "assistant",
        cutoff_len: int | None = None,
        reasoning: str = "keep",
        expand_turns: bool = True,
        system: str | None = None,
        tools: list[dict] | None = None,
    ):
        self.tokenizer = tokenizer
        self.system, self.tools = system, tools  # what a conversation lacks: see Conversation.with_defaults
        self.train_on = train_on
        self.cutoff_len = cutoff_len
        self.reasoning = reasoning
        templated = bool(getattr(tokenizer, "chat_template", None))
        self.eot_tokens = (
            end_of_turn_tokens(tokenizer) if templated else ([tokenizer.eos_token] if tokenizer.eos_token else [])
        )
        self.reasoning_mode = thinking.mode(tokenizer) if templated else "none"
        # drop: the generation prompt says thinking is off, so an empty think block it writes is prompt
        self.template_kwargs = (
            {"enable_thinking": False} if reasoning == "drop" and thinking.has_switch(tokenizer) else {}
        )
        self._text_arguments: bool | None = None  # probed on the first conversation with tool calls
        self._locator = TurnLocator(self.eot_tokens, reasoning, expand_turns)
        self.eot_ids = [tokenizer.convert_tokens_to_ids(t) for t in self.eot_tokens]
        self._special_text = SpecialText(special_tokens(tokenizer))
        self._backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self._plain: PlainTextEncoder | None = None
        self._markup_ids = set(getattr(tokenizer, "added_tokens_decoder", {}))

    @property
    def defaults(self) -> dict:
        """What this encoder gives a conversation that leaves it out, for engines that render alone (see
        `templates.with_run_defaults`): only the defaults there are."""
        found = {"system": self.system, "tools": self.tools, "thinking": self.template_kwargs.get("enable_thinking")}
        return {k: v for k, v in found.items() if v is not None}

    # ------------------------------------------------------------------ rendering

    def render(
        self,
        conv: Conversation,
        messages=None,
        add_generation_prompt: bool = False,
        tools=None,
        plain: bool = False,
        **template_kwargs,
    ) -> str:
        """The template's text for `conv` (or `messages`), exactly as `apply_chat_template` renders it.

        plain: without the reasoning rule's template switches (how the template renders history)."""
        kwargs = {} if plain else {**self.template_kwargs, **template_kwargs}
        messages = conv.template_messages() if messages is None else messages
        tools = conv.tools if tools is None else tools
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
            if (
                self.reasoning_mode != "prompted"
                or add_generation_prompt
                or plain
                or not messages
                or messages[-1]["role"] != "assistant"
            ):
                return text
            reasoning = messages[-1].get("reasoning_content")
            if not reasoning:
                return text
            # the last turn as the model writes it after a generation prompt that opened its think block
            prompt = self.tokenizer.apply_chat_template(
                messages[:-1], tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )
            return thinking.native_turn(prompt, text, reasoning) or text
        except Exception as exc:  # jinja raise_exception() and template bugs alike
            raise TunelabError(f"{conv.source}: the chat template refused this conversation ({exc})") from None

    def prompt_ids(self, conv: Conversation, **template_kwargs) -> list[int]:
        """The ids inference feeds the model for `conv` (which ends before the answer to generate)."""
        conv = conv.with_defaults(self.system, self.tools)
        shield, messages, tools, _ = self._shielded(conv)
        text = self.render(conv, messages, add_generation_prompt=True, tools=tools, **template_kwargs)
        self._check_tools_rendered(conv, messages, text, add_generation_prompt=True, **template_kwargs)
        text, _, protected = shield.unwrap(text, None, conv.source)
        ids, _ = self._tokenize([_Plan(text, None, protected=protected)])[0]
        return ids if ids is not None else self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ encoding

    def encode(self, conv: Conversation) -> Encoded:
        """The whole conversation's sample (a turn that needs a sample of its own is left out: see `samples`)."""
        return self.encode_many([conv])[0]

    def samples(self, conv: Conversation) -> list[Encoded]:
        """Every sample of `conv`: the whole conversation first, then each turn trained apart."""
        return self.encode_many([conv])

    def encode_many(self, convs: list[Conversation]) -> list[Encoded]:
        """Encode a batch: templates render one by one, then a single tokenizer call covers every text.

        The batched call lets a fast tokenizer spread the work over its threads; each text's tokens are
        those of the whole text, so the batch equals encoding one at a time. A conversation gives one
        sample, plus one per turn that must be trained apart, in that order.
        """
        with _gc_paused():  # a few objects per token, all kept: each collection they set off walks the whole heap
            plans = [plan for conv in convs for plan in self._plans(conv)]
            tokenized = self._tokenize(plans)
            return [self._finish(plan, ids, offsets) for plan, (ids, offsets) in zip(plans, tokenized)]

    def _plans(self, conv: Conversation) -> list[_Plan]:
        if conv.text is not None:
            self._check_text(conv.text, conv.source, "field 'text'")
            # pre-training text is data through and through: any special-token text in it is plain text
            return [_Plan(conv.text, None, raw=True, protected=[(0, len(conv.text))], source=conv.source)]
        conv = conv.with_defaults(self.system, self.tools)
        shield, messages, tools, lost = self._shielded(conv)
        full = self.render(conv, messages, tools=tools)
        self._check_tools_rendered(conv, messages, full)
        if self.train_on == "all":
            text, _, protected = shield.unwrap(full, None, conv.source)
            return [_Plan(text, None, protected=protected, source=conv.source)]
        turns = [i for i in conv.assistant_indices if i >= conv.train_from]
        if self.train_on == "last":
            turns = turns[-1:]

        def render(msgs, generation_prompt, plain=False):
            return self.render(conv, msgs, generation_prompt, tools, plain=plain)

        found = self._locator.locate(render, messages, turns, full, conv.source)
        for (_, e0), (s1, _) in zip(found.spans, found.spans[1:]):
            if s1 < e0:
                raise TunelabError(f"{conv.source}: assistant turns overlap in the rendered text")
        text, spans, protected = shield.unwrap(full, found.spans, conv.source)
        plans = [
            _Plan(
                text, spans, protected=protected, source=conv.source, reasoning_lost=lost + found.unrendered_reasoning
            )
        ]
        for i, cut, span in found.own:
            text, spans, protected = shield.unwrap(cut, [span], conv.source)
            plans.append(
                _Plan(text, spans, protected=protected, source=f"{conv.source} turn {i}", own_turn=True, turn=i)
            )
        return plans

    def _check_tools_rendered(self, conv: Conversation, messages, text: str, **render_kwargs) -> None:
        if conv.tools and text == self.render(conv, messages, tools=[], **render_kwargs):
            raise TunelabError(
                f"{conv.source}: the chat template does not render tools (the conversation renders "
                "the same without them); use a template with tool support, or no `tools`"
            )

    def _shielded(self, conv: Conversation):
        """(shield, messages, tools, reasoning lost): the conversation's strings checked, reasoning kept per
        the rule, special-token text swapped for sentinels."""
        messages = conv.template_messages()
        for i, message in enumerate(messages):
            self._check_text(message, conv.source, f"message {i} ({message['role']})")
        self._check_text(conv.tools, conv.source, "tools")
        messages, lost = thinking.apply_rule(messages, self.reasoning, self.reasoning_mode)
        if any(m.get("tool_calls") for m in messages):
            if self._text_arguments is None:
                self._text_arguments = arguments_as_text(self.tokenizer)
            if self._text_arguments:
                messages = with_text_arguments(messages)
        shield = Shield(self._special_text)
        return shield, shield.wrap(messages), shield.wrap(conv.tools), lost

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
                raise TunelabError(
                    f"{source}: {field} holds a lone surrogate U+{ord(bad.group()):04X} "
                    "(from a JSON \\u escape?); expected valid Unicode text"
                )

    def _tokenize(self, plans: list[_Plan]) -> list[tuple[list[int] | None, list | None]]:
        """(ids, character offsets) per plan, from one call to the fast tokenizer's backend.

        The backend is called directly: transformers' wrapper gives the same ids but spends as long
        again turning them into Python lists. A tokenizer without a backend (a slow, pure-Python one)
        has no offsets; its texts are tokenized between span edges instead (see `_by_segment`).
        """
        if not plans:
            return []
        if self._backend is None:
            return [(None, None)] * len(plans)
        out = [
            (e.ids, e.offsets) for e in self._backend.encode_batch([p.text for p in plans], add_special_tokens=False)
        ]
        for k, plan in enumerate(plans):
            if plan.protected:
                self._plain = self._plain or PlainTextEncoder(self.tokenizer)
                out[k] = self._plain.fix(plan.text, *out[k], plan.protected)
        return out

    def _finish(self, plan: _Plan, ids, offsets) -> Encoded:
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
        return Encoded(ids, labels, truncated, plan.source, literal, plan.own_turn, plan.reasoning_lost, plan.turn)

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
