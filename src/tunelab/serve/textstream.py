"""A completion's text as its tokens come: decoded a few tokens at a time, with its stop strings found and the
characters that could still become one held back, all in time linear in the text and the stop strings."""

from __future__ import annotations


def _borders(s: str) -> list[int]:
    """KMP's table: for each prefix of `s`, the length of its longest proper prefix that is also its suffix."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        if s[i] == s[k]:
            k += 1
        table[i] = k
    return table


class StopScan:
    """A job's stop strings found in its text as it grows, in time linear in the text and the stops.

    One KMP matcher per stop string, fed only the new characters (and only once its first character
    shows up); its state is how much of the text's end could still become that stop, which is what a
    stream must hold back. A 400 KB stop list so costs each step about its new characters, not the list.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.first: dict[str, list[int]] = {}
        for i, s in enumerate(self.stops):
            self.first.setdefault(s[0], []).append(i)
        self.tables: dict[int, list[int]] = {}
        self.states: dict[int, int] = {}  # stop -> how many of its characters end the text, where > 0
        self.length = 0

    def feed(self, new: str) -> tuple[int | None, int]:
        """(where the earliest stop ending in `new` starts in the whole text, or None; the characters to hold)."""
        hit, offset = None, self.length
        self.length += len(new)
        candidates = set(self.states)
        for ch in self.first.keys() & set(new):
            candidates.update(self.first[ch])
        for i in candidates:
            s, m = self.stops[i], self.states.pop(i, 0)
            table = self.tables.get(i) or self.tables.setdefault(i, _borders(s))
            for pos in range(0 if m else new.find(s[0]), len(new)):  # a first character is in `new`
                c = new[pos]
                while m and s[m] != c:
                    m = table[m - 1]
                if s[m] == c:
                    m += 1
                if m == len(s):  # its first occurrence is all a caller needs: the text ends there
                    start = offset + pos + 1 - m
                    hit = start if hit is None else min(hit, start)
                    m = 0
                    break
            if m:
                self.states[i] = m
        return hit, max(self.states.values(), default=0)


def hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become a stop string: they wait for the next token."""
    return max((StopScan([s]).feed(text[1 - len(s) :])[1] for s in stops if len(s) > 1), default=0)


class IncrementalText:
    """A row's text, decoding only the tokens since the last whole character with the ones before it as
    context (vLLM's incremental detokenizer), so a long answer costs linear time, not quadratic.

    Special tokens are left out of the window as `skip_special_tokens` leaves them out of the whole: one
    at a window's start would make SentencePiece drop the next word's leading space."""

    def __init__(self, tokenizer, tokens: list[int], special: set[int] = frozenset()):
        self.tokenizer, self.tokens, self.special = tokenizer, tokens, special
        self.shown: list[int] = []
        self.prefix = self.read = 0
        self.text = ""

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """`token`'s new characters; "" while they end in half a character."""
        self.tokens.append(token)
        if token in self.special:
            return ""
        self.shown.append(token)
        before = self.decode(self.shown[self.prefix : self.read])
        now = self.decode(self.shown[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.shown)
        self.text += now[len(before) :]
        return now[len(before) :]

    def whole(self) -> str:
        return self.decode(self.tokens)


def special_ids(tokenizer) -> set[int]:
    """The ids `skip_special_tokens` drops."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return ids | {i for i, t in added.items() if getattr(t, "special", False)}
