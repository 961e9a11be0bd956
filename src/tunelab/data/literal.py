"""Message text is plain text: a `<|im_end|>` typed into a message is the tokens of its characters.

A tokenizer reads its special tokens anywhere in a string, so a record that merely mentions
`<|im_end|>` (a question about chat templates, a code snippet) would close the turn early and let
data act as markup. Templates, though, write their markup into the same string as the messages.
The two are told apart by rendering with every such text swapped for a sentinel: whatever special
token the rendered string holds is then the template's own, and the sentinels mark the characters
that came from messages ("protected" ranges once swapped back).

Tokenization stays the tokenizer's own everywhere else. A fast tokenizer splits its input at special
tokens and encodes the pieces between them independently, so only the pieces that hold protected
text are encoded again, with special-token matching off, and spliced in between the same markup.
"""

from __future__ import annotations

import bisect
import re
import secrets
from typing import Any

from ..errors import TunelabError

_NONCE = secrets.token_hex(4)
_SENTINEL = re.compile(f"tlx{_NONCE}q(\\d+)q")
_ANY_SENTINEL = re.compile(f"tlx{_NONCE}q", re.IGNORECASE)
# An added token the copy of the tokenizer splits at, like any markup, so a re-encoded piece is not taken
# for the start of the text (SentencePiece-style tokenizers prepend a word boundary only there).
_BOUNDARY = "<tunelab|piece-boundary>"


class SpecialText:
    """Finds a tokenizer's special-token text in strings. Built once per tokenizer: Llama-3 alone has 256
    special tokens, and their pattern on every conversation would double the cost of encoding."""

    def __init__(self, specials: list[str]):
        self.pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._heads = {t[:2] for t in specials}  # a cheap substring test before the regex

    def holds(self, text: str) -> bool:
        return (
            self.pattern is not None and any(h in text for h in self._heads) and self.pattern.search(text) is not None
        )


class Shield:
    """Swaps special-token text in one conversation's strings for sentinels, and maps a rendering back."""

    def __init__(self, special: SpecialText):
        self._special = special
        self.literals: list[str] = []

    def wrap(self, value: Any) -> Any:
        """`value` with every special-token text in its strings (nested in dicts and lists) swapped."""
        if isinstance(value, str):
            pattern = self._special.pattern
            return pattern.sub(self._swap, value) if pattern is not None and self._special.holds(value) else value
        if isinstance(value, dict):
            return {k: self.wrap(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.wrap(v) for v in value]
        return value

    def _swap(self, match: re.Match) -> str:
        self.literals.append(match.group())
        return f"tlx{_NONCE}q{len(self.literals) - 1}q"

    def unwrap(self, text: str, spans: list[tuple[int, int]] | None, source: str):
        """(text, spans, protected ranges) with the sentinels swapped back; spans are moved to match."""
        if not self.literals:
            return text, spans, []
        pieces, protected, shifts, at, delta = [], [], [], 0, 0
        for m in _SENTINEL.finditer(text):
            literal = self.literals[int(m.group(1))]
            pieces.append(text[at : m.start()])
            start = m.start() + delta
            protected.append((start, start + len(literal)))
            pieces.append(literal)
            delta += len(literal) - len(m.group())
            shifts.append((m.end(), delta))
            at = m.end()
        pieces.append(text[at:])
        out = "".join(pieces)
        if _ANY_SENTINEL.search(out):
            raise TunelabError(
                f"{source}: the chat template changed message text that holds special-token text "
                "(it escaped or re-cased it), so its characters cannot be kept as plain text"
            )
        if spans is not None:
            ends = [e for e, _ in shifts]

            def moved(p: int) -> int:
                k = bisect.bisect_right(ends, p)
                return p + (shifts[k - 1][1] if k else 0)

            spans = [(moved(a), moved(b)) for a, b in spans]
        return out, spans, protected


class PlainTextEncoder:
    """Re-encodes the pieces of a text that hold protected characters, special-token matching off."""

    def __init__(self, tokenizer):
        from tokenizers import AddedToken, Tokenizer

        backend = tokenizer.backend_tokenizer
        self.plain = Tokenizer.from_str(backend.to_str())
        self.plain.no_truncation()
        self.plain.no_padding()
        self.plain.encode_special_tokens = True
        self.plain.add_tokens([AddedToken(_BOUNDARY, special=False, normalized=False)])
        self.special_ids = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}

    def fix(self, text: str, ids: list[int], offsets: list[tuple[int, int]], protected: list[tuple[int, int]]):
        """(ids, offsets) of `text` with protected characters read as plain text, markup untouched."""
        starts = [a for a, _ in protected]

        def inside(pos: int) -> bool:
            k = bisect.bisect_right(starts, pos) - 1
            return k >= 0 and protected[k][0] <= pos < protected[k][1]

        literal = [k for k, t in enumerate(ids) if t in self.special_ids and inside(offsets[k][0])]
        if not literal:
            return ids, offsets
        marks = [k for k, t in enumerate(ids) if t in self.special_ids and not inside(offsets[k][0])]
        out_ids: list[int] = []
        out_offsets: list[tuple[int, int]] = []
        done = 0  # tokens before this index are already in the output
        for k in literal:
            if k < done:
                continue
            m = bisect.bisect_left(marks, k)
            left = marks[m - 1] if m else -1
            right = marks[m] if m < len(marks) else len(ids)
            lo = offsets[left][1] if left >= 0 else 0
            hi = offsets[right][0] if right < len(ids) else len(text)
            out_ids += ids[done : left + 1]
            out_offsets += offsets[done : left + 1]
            piece_ids, piece_offsets = self._encode_piece(text[lo:hi], lo)
            out_ids += piece_ids
            out_offsets += piece_offsets
            done = right
        out_ids += ids[done:]
        out_offsets += offsets[done:]
        return out_ids, out_offsets

    def _encode_piece(self, piece: str, at: int) -> tuple[list[int], list[tuple[int, int]]]:
        prefix = _BOUNDARY if at else ""
        enc = self.plain.encode(prefix + piece, add_special_tokens=False)
        shift = at - len(prefix)
        pairs = [(t, (a + shift, b + shift)) for t, (a, b) in zip(enc.ids, enc.offsets) if a >= len(prefix)]
        return [t for t, _ in pairs], [o for _, o in pairs]
