"""One choice's text as its tokens arrive: incremental detokenization and stop strings.

Decoding every token list again at each token costs O(n^2); instead (as transformers' TextStreamer and vLLM do)
the text grows by the decode of the tokens since an earlier offset, minus the decode of that prefix, once it does
not end in an incomplete UTF-8 character (U+FFFD). The tokens are decoded from the first new token on, with
special tokens skipped, so the text equals `tokenizer.decode(new_tokens, skip_special_tokens=True)` (what
`svdsparse generate` prints) at every point where it is complete.

A stop string ends the choice once the text holds it: the text is cut before it, and the token that completed it
is the choice's last. Streamed text holds back what could still become a stop string (a suffix that is a prefix
of one) and incomplete characters.
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """decode: token ids -> text (special tokens skipped); stops: the stop strings (non-empty)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, tuple(stops)
        self.tokens: list[int] = []
        self.text = ""  # the text so far (complete characters), cut before a stop string once one is found
        self.stopped = False  # a stop string was found
        self.sent = 0  # characters already handed out by `ready`
        self._prefix = 0  # token offsets of the incremental decode
        self._read = 0

    def add(self, token: int) -> int:
        """Appends a token; returns the length of the text before it (the token's text offset)."""
        offset = len(self.text)
        self.tokens.append(token)
        before = self.decode(self.tokens[self._prefix:self._read])
        now = self.decode(self.tokens[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._grow(now[len(before):])
            self._prefix, self._read = self._read, len(self.tokens)
        return offset

    def finish(self) -> None:
        """The choice ended: text held back as an incomplete character is taken as decoded."""
        if not self.stopped and self._read < len(self.tokens):
            before = self.decode(self.tokens[self._prefix:self._read])
            self._grow(self.decode(self.tokens[self._prefix:])[len(before):])
            self._prefix = self._read = len(self.tokens)

    def _grow(self, piece: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True

    def ready(self, final: bool = False) -> str:
        """The text not yet handed out that can be: all of it when final or stopped, else without a suffix that
        could still become a stop string."""
        end = len(self.text)
        if not (final or self.stopped):
            end -= max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return piece
