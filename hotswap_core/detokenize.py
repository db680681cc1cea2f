"""Incremental detokenisation: the text of a growing token sequence at a constant cost per token.

Decoding the whole output again for every new token is O(n) per token (O(n^2) per response). Here only a short
window is decoded (vLLM's and TGI's method): the tokens from ``prefix`` on, whose text is already known up to
``read``. When the window decodes to more text than its known part and does not end in U+FFFD (a multi-byte
character still split across tokens, or a byte-level merge still open), the new characters are final: they are
appended and the window slides forward. Decoding a window that starts at a token boundary where every earlier
character was complete gives the same characters a full decode gives there, so the text stays identical to
``decode(all ids)``; ``finish()`` flushes what is still pending (an incomplete character at the very end decodes
as U+FFFD, as a full decode would).
"""

from __future__ import annotations

from collections.abc import Callable

_PENDING = "\ufffd"  # what a byte sequence cut inside a character decodes to (errors="replace")
# Tokens a window may hold open while its text ends in U+FFFD. A character is at most 4 bytes, and in valid
# text 4 tokens close it; random or invalid bytes rarely keep a window open for more than a few. Past this (a
# model that emits U+FFFD itself) the text is taken as it is, so a stream never stalls.
_MAX_OPEN = 32


class IncrementalDetokenizer:
    """Feed token ids with ``push``; ``text`` is the decoded text so far (complete characters only)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] is the window's already-decoded part (context for the decoder)
        self._read = 0

    def push(self, token_id: int) -> str:
        """Append one token; return the text it completed (often "", when a character is still open)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """The text still pending at the end (an incomplete character decodes as U+FFFD, as in a full decode)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        known = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if window.startswith(known):
            delta = window[len(known) :]
            still_open = not delta or delta.endswith(_PENDING)
            if still_open and not final and len(self.ids) - self._read < _MAX_OPEN:
                return ""
        else:  # the decoder changed text it gave before (a space clean-up rule): resynchronise on a full decode
            delta = self._decode(self.ids)[len(self.text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


class TokenTexts:
    """The text of single tokens, for log-probabilities: each id decoded once, then kept (at most the
    vocabulary's size). Special tokens keep their text (an alternative may be EOS)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._decode([token_id])
        return text
