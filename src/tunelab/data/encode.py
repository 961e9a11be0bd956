"""Conversation -> (input_ids, labels): the one place that decides which tokens are trained.

The trained tokens of an assistant turn are exactly its content plus the end-of-turn token(s) that
follow it, for any Jinja chat template. The turn is located by rendering: the prompt for turn i
(messages before it, with the generation prompt) must be a prefix of the whole rendered
conversation, and the content follows where the template puts an answer. A template that is not
prefix-stable cannot be split into turns, so it fails with the sample named instead of guessing.
Text the tokenizer would read as a special token (`<|im_end|>` typed into a message) or cannot read
at all (a lone surrogate from a JSON escape) is refused with the sample named: it would break the
turn structure the mask relies on.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import re
from dataclasses import dataclass

from ..errors import TunelabError
from .conversation import Conversation

IGNORE = -100
_PROBE = "tunelab-probe-answer"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    source: str = ""

    @property
    def n_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


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
    """Renders and tokenizes conversations for one tokenizer (whose chat_template is already set)."""

    def __init__(self, tokenizer, train_on: str = "assistant", cutoff_len: int | None = None):
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.cutoff_len = cutoff_len
        self.eot_tokens = end_of_turn_tokens(tokenizer) if getattr(tokenizer, "chat_template", None) else (
            [tokenizer.eos_token] if tokenizer.eos_token else [])
        self.eot_ids = [tokenizer.convert_tokens_to_ids(t) for t in self.eot_tokens]
        self._eot_re = re.compile("(?:" + "|".join(map(re.escape, self.eot_tokens)) + ")+") if self.eot_tokens else None
        specials = special_tokens(tokenizer)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._special_heads = {t[:2] for t in specials}  # a cheap substring test before the regex

    def render(self, conv: Conversation, messages=None, add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                conv.template_messages() if messages is None else messages,
                tools=conv.tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja raise_exception() and template bugs alike
            raise TunelabError(f"{conv.source}: the chat template refused this conversation ({exc})") from None

    def encode(self, conv: Conversation) -> Encoded:
        return self.encode_many([conv])[0]

    def encode_many(self, convs: list[Conversation]) -> list[Encoded]:
        """Encode a batch: templates render one by one, then a single tokenizer call covers every text.

        The batched call lets a fast tokenizer spread the work over its threads; the labels come from
        the offsets of the whole text, so they equal what `encode` gives one conversation at a time.
        """
        with _gc_paused():  # a few objects per token, all kept: each collection they set off walks the whole heap
            plans = [self._plan(conv) for conv in convs]
            tokenized = self._tokenize_batch([text for text, _, _ in plans])
            return [self._label(conv, plan, ids, offsets) for conv, plan, (ids, offsets) in zip(convs, plans, tokenized)]

    def _label(self, conv: Conversation, plan, ids: list[int], offsets) -> Encoded:
        text, spans, raw = plan
        if raw:
            pair = self._wrap_text(ids)
        elif spans is None:
            pair = (ids, list(ids))
        else:
            pair = _labels_from_offsets(ids, offsets, spans) if offsets is not None else None
            pair = pair or self._tokenize_by_segment(text, spans)
        return self._finish(pair, conv.source)

    def _plan(self, conv: Conversation) -> tuple[str, list[tuple[int, int]] | None, bool]:
        """(rendered text, trained character spans or None for all, raw text?) for one conversation."""
        if conv.text is not None:
            self._check_text(conv.text, conv.source, "field 'text'", specials=False)
            return conv.text, None, True
        for i, message in enumerate(conv.template_messages()):
            for key, value in message.items():
                self._check_text(value, conv.source, f"message {i} ({message['role']}) {key}")
        self._check_text(conv.tools, conv.source, "tools")
        full = self.render(conv)
        if self.train_on == "all":
            return full, None, False
        turns = conv.assistant_indices
        if self.train_on == "last":
            turns = turns[-1:]
        spans = [self._answer_span(conv, full, i) for i in turns]
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            if s1 < e0:
                raise TunelabError(f"{conv.source}: assistant turns overlap in the rendered text")
        return full, spans, False

    def _check_text(self, value, source: str, field: str, specials: bool = True) -> None:
        """Refuse text that cannot be tokenized as written: lone surrogates, special tokens typed as text."""
        stack = [value]
        while stack:  # iterative: tool calls may nest deeper than Python's recursion limit
            item = stack.pop()
            if isinstance(item, dict):
                stack += [*item.keys(), *item.values()]
            elif isinstance(item, (list, tuple)):
                stack += item
            elif isinstance(item, str):
                if (bad := _SURROGATE.search(item)) is not None:
                    raise TunelabError(f"{source}: {field} holds a lone surrogate U+{ord(bad.group()):04X} "
                                       "(from a JSON \\u escape?); expected valid Unicode text")
                if specials and self._special_re is not None and any(p in item for p in self._special_heads) \
                        and (hit := self._special_re.search(item)):
                    raise TunelabError(
                        f"{source}: {field} holds the text {hit.group()!r}, a special token of this tokenizer; "
                        "it would be read as that control token and break the turn structure, so remove it"
                    )

    def _answer_span(self, conv: Conversation, full: str, i: int) -> tuple[int, int]:
        messages = conv.template_messages()
        prompt = self.render(conv, messages[:i], add_generation_prompt=True)
        if not full.startswith(prompt):
            raise TunelabError(
                f"{conv.source}: the chat template does not render turn by turn (the prompt of assistant "
                f"message {i} is not a prefix of the whole conversation), so its answer tokens cannot be "
                "told apart; use a built-in template (template: chatml, llama3, gemma, alpaca, dolly)"
            )
        # Where the template puts an answer: found with a probe answer, so that text equal to the answer
        # elsewhere (a later user message, a template's reasoning block) is never taken for it.
        probe = [dict(m, content=_PROBE) if j == i else m for j, m in enumerate(messages)]
        at = self.render(conv, probe).find(_PROBE, len(prompt))
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

    def _tokenize_batch(self, texts: list[str]) -> list[tuple[list[int], list | None]]:
        """(ids, character offsets or None) per text, from one call.

        A fast tokenizer's Rust backend is called directly: transformers' wrapper gives the same ids
        but spends as long again turning them into Python lists.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is None:
            return [(self._tokenize(t), None) for t in texts]
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)] if texts else []

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _tokenize_by_segment(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """For a span edge inside a token (or a slow tokenizer): tokenize the pieces between edges apart."""
        bounds = sorted({b for span in spans for b in span})
        ids: list[int] = []
        labels: list[int] = []
        cuts = [0] + bounds + [len(text)]
        for a, b in zip(cuts, cuts[1:]):
            if a == b:
                continue
            seg = self._tokenize(text[a:b])
            trained = any(s <= a and b <= e for s, e in spans)
            ids += seg
            labels += seg if trained else [IGNORE] * len(seg)
        return ids, labels

    def _wrap_text(self, ids: list[int]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            ids = [tok.bos_token_id] + ids
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        return ids, list(ids)

    def _finish(self, pair: tuple[list[int], list[int]], source: str) -> Encoded:
        ids, labels = pair
        truncated = self.cutoff_len is not None and len(ids) > self.cutoff_len
        if truncated:
            ids, labels = ids[: self.cutoff_len], labels[: self.cutoff_len]
        return Encoded(ids, labels, truncated, source)

    def ends_with_eot(self, sample: Encoded) -> bool:
        trained = [x for x in sample.labels if x != IGNORE]
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


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]):
    """Labels from whole-text token offsets, or None when a span edge falls inside a token.

    Whole-text tokens are what inference sees, so they are preferred. A token is trained when it has
    width and lies inside a span; spans are sorted and disjoint, token offsets sorted by start.
    """
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        i, j = bisect.bisect_left(offsets, (a,)), bisect.bisect_left(offsets, (b,))
        if (i and offsets[i - 1][1] > a) or (j and offsets[j - 1][1] > b):
            return None
        labels[i:j] = [t if offsets[k][1] > offsets[k][0] else IGNORE for k, t in enumerate(ids[i:j], i)]
    return ids, labels
