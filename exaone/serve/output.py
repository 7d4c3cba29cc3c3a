"""What a choice's tokens become on the event loop: text (detokenized incrementally), cut at stop
strings, parsed into reasoning / content / tool calls for chat, with log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

from exaone.serve.parsers import OutputParser, ToolCall, _partial_tail


class Detokenizer:
    """Incremental decoding that gives the same text as decoding everything at once: each new
    token's text is the difference between two decodes of a short window (so a tokenizer that drops
    a leading space at the start of a decode does it to both), and bytes that do not form a whole
    UTF-8 character yet wait for the next token."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been given out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


class StopStrings:
    """Cuts the text before the first stop string; holds back a tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        keep = max(_partial_tail(buf, s) for s in self.stops)
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Choice:
    """One generated sequence of a request (`n` per prompt)."""

    index: int
    prompt_index: int
    detok: Detokenizer
    stops: StopStrings
    parser: OutputParser | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per token: (token id, logprob, [(id, logprob)])
    text: str = ""  # raw text given out (completions: the answer)
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    first_at: float | None = None
    last_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def on_token(self, token: int, lp) -> tuple[str, bool]:
        """The text this token releases, and whether a stop string ended the choice."""
        self.tokens.append(token)
        if lp is not None:
            self.logprobs.append((token, lp[0], lp[1]))
        released, hit = self.stops.feed(self.detok.add(token))
        self.text += released
        if hit:
            self.finish_reason = "stop"
        return released, hit

    def on_finish(self, reason: str) -> str:
        """The text still held back, now released; the finish reason is set."""
        tail, hit = self.stops.feed(self.detok.flush())
        if not hit:
            tail += self.stops.flush()
        self.text += tail
        if self.finish_reason is None:
            self.finish_reason = "stop" if hit else reason
        return tail

    def parse(self, text: str, final: bool = False) -> list[tuple[str, object]]:
        """Chat: reasoning / content / tool-call events of newly released text (accumulated here too)."""
        if self.parser is None:
            events = [("content", text)] if text else []
        else:
            events = self.parser.feed(text) if text else []
            if final:
                events += self.parser.finish()
        for kind, value in events:
            if kind == "reasoning":
                self.reasoning += value
            elif kind == "content":
                self.content += value
            else:
                self.tool_calls.append(value)
        return events

    def chat_finish_reason(self) -> str:
        if self.tool_calls and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason or "length"
