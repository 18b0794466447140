"""Token ids to text as they are made, at a cost per token independent of the answer's length: decoding the
whole answer again per token (quadratic in its length) is what a 2,000-token stream must not do."""
from __future__ import annotations


class Detokenizer:
    """Decodes a short window of the latest tokens and emits what it adds to the text, the way vLLM and TGI do
    (their prefix and read offsets). The window starts at a token that begins a character, so its text is
    exactly the tail of the whole answer's; a token that ends inside a multi-byte character (the text ends
    in U+FFFD) waits for the rest. `flush` says whatever is left when the answer ends."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # the window's first token
        self.read = 0  # tokens before this one are emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        said = self._text(self.prefix, self.read)
        text = self._text(self.prefix, len(self.ids))
        if len(text) <= len(said) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(said):]

    def _text(self, start: int, end: int) -> str:
        return self.tok.decode(self.ids[start:end], skip_special_tokens=True) if end > start else ""


class StopStrings:
    """Cuts the text at the first stop string. Holds back the last (longest stop - 1) characters until more text
    shows they start no stop string, so a stop string split across tokens is never sent in part."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.keep = max(map(len, stops), default=1) - 1
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string ended the answer)."""
        buf = self.held + text
        cut = min((buf.find(s) for s in self.stops if s in buf), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        split = max(len(buf) - self.keep, 0)
        self.held = buf[split:]
        return buf[:split], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
