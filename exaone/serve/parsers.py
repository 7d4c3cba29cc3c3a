"""EXAONE's output formats, parsed as text arrives: thinking and tool calls.

- Reasoning. EXAONE-4.0 and K-EXAONE think between `<think>` and `</think>`, EXAONE-Deep between
  `<thought>` and `</thought>`. Their chat templates open the tag in the prompt itself when thinking
  is on (EXAONE-4.0's generation prompt ends `<think>\\n`; with thinking off it closes it at once,
  `<think>\\n\\n</think>\\n\\n`), so whether the output starts inside the reasoning is read from the
  rendered prompt, not guessed from the output. An output that opens the tag itself (first thing it
  writes) is read the same way.
- Tool calls. EXAONE-4.0's template (its "# Available Tools" section) asks for one JSON object per call,
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; each becomes an OpenAI `tool_calls` entry
  with the arguments as a JSON string. A block that is not such JSON stays in the content as written.

Both parsers take text deltas and return events; text that may be the start of a tag is held back
until the next delta decides it, so streamed and whole-text parses give the same result.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

THINK = ("<think>", "</think>")
THOUGHT = ("<thought>", "</thought>")
TOOL_CALL = ("<tool_call>", "</tool_call>")
MODES = ("auto", "exaone", "none")


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def reasoning_tags(chat_template: str | None) -> tuple[str, str]:
    """EXAONE-Deep's `<thought>` when its template uses it, else `<think>`."""
    return THOUGHT if chat_template and THOUGHT[0] in chat_template else THINK


def reasoning_default(chat_template: str | None) -> bool:
    """`auto`: on when the checkpoint's chat template knows a thinking tag (EXAONE-4.0, K-EXAONE, Deep)."""
    return bool(chat_template) and any(tag in chat_template for tag in (THINK[0], THOUGHT[0]))


def tools_default(chat_template: str | None) -> bool:
    """`auto`: on when the checkpoint's chat template writes EXAONE's `<tool_call>` format."""
    return bool(chat_template) and TOOL_CALL[0] in chat_template


def prompt_opens_reasoning(prompt: str, tags: tuple[str, str]) -> bool:
    """True when the rendered prompt ends inside an open reasoning block (thinking on)."""
    start, end = tags
    at = prompt.rfind(start)
    return at >= 0 and prompt.find(end, at) < 0


class ReasoningParser:
    """Splits text into ("reasoning", text) and ("content", text) events."""

    def __init__(self, tags: tuple[str, str] = THINK, in_reasoning: bool = False):
        self.start, self.end = tags
        self.state = "reasoning" if in_reasoning else "begin"
        self.buf = ""
        self.strip_next = in_reasoning  # drop the whitespace a section starts with

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.state == "begin":
                head = self.buf.lstrip()
                if head.startswith(self.start):
                    self.buf = head[len(self.start) :]
                    self.state, self.strip_next = "reasoning", True
                    continue
                if not head or self.start.startswith(head):
                    break  # could still become the opening tag
                self.state = "content"
                continue
            if self.state == "reasoning":
                if self.strip_next:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        break
                    self.strip_next = False
                at = self.buf.find(self.end)
                if at >= 0:
                    self._emit(out, "reasoning", self.buf[:at])
                    self.buf = self.buf[at + len(self.end) :]
                    self.state, self.strip_next = "content", True
                    continue
                keep = _partial_tail(self.buf, self.end)
                self._emit(out, "reasoning", self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                break
            # content
            if self.strip_next:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.strip_next = False
            self._emit(out, "content", self.buf)
            self.buf = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        kind = "reasoning" if self.state == "reasoning" else "content"
        text = self.buf.lstrip() if self.strip_next else self.buf
        self._emit(out, kind, text)
        self.buf = ""
        return out

    @staticmethod
    def _emit(out: list, kind: str, text: str):
        if text:
            out.append((kind, text))


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = "call_" + secrets.token_hex(12)

    def to_json(self, index: int | None = None) -> dict:
        out = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out = {"index": index, **out}
        return out


def parse_tool_call(body: str) -> ToolCall | None:
    """`{"name": ..., "arguments": {...}}` (or "parameters") -> ToolCall; None if it is not that."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        text = args
    else:
        text = json.dumps(args, ensure_ascii=False)
    return ToolCall(obj["name"], text)


class ToolCallParser:
    """Splits content into ("content", text) and ("tool_call", ToolCall) events."""

    def __init__(self, tags: tuple[str, str] = TOOL_CALL):
        self.start, self.end = tags
        self.inside = False
        self.buf = ""
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        out: list[tuple[str, object]] = []
        while self.buf:
            if not self.inside:
                at = self.buf.find(self.start)
                if at >= 0:
                    self._content(out, self.buf[:at])
                    self.buf = self.buf[at + len(self.start) :]
                    self.inside = True
                    continue
                keep = _partial_tail(self.buf, self.start)
                self._content(out, self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                break
            at = self.buf.find(self.end)
            if at < 0:
                break  # the call is not complete yet
            self._call(out, self.buf[:at], closed=True)
            self.buf = self.buf[at + len(self.end) :]
            self.inside = False
        return out

    def finish(self) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        if self.inside:  # the output ended inside a call (e.g. EOS right after the JSON)
            self._call(out, self.buf, closed=False)
        else:
            self._content(out, self.buf)
        self.buf, self.inside = "", False
        return out

    def _call(self, out: list, body: str, closed: bool):
        call = parse_tool_call(body.strip())
        if call is None:
            self._content(out, self.start + body + (self.end if closed else ""))
            return
        self.calls += 1
        out.append(("tool_call", call))

    def _content(self, out: list, text: str):
        if text and not (self.calls and not text.strip()):  # whitespace between calls is not content
            out.append(("content", text))


class OutputParser:
    """Reasoning, then tool calls in what is left: events ("reasoning" | "content", str) and
    ("tool_call", ToolCall)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None):
        self.reasoning, self.tools = reasoning, tools

    def feed(self, text: str) -> list[tuple[str, object]]:
        return self._tools(self.reasoning.feed(text) if self.reasoning else [("content", text)], False)

    def finish(self) -> list[tuple[str, object]]:
        return self._tools(self.reasoning.finish() if self.reasoning else [], True)

    def _tools(self, events: list, final: bool) -> list[tuple[str, object]]:
        if self.tools is None:
            return [e for e in events if e[1]]
        out = []
        for kind, text in events:
            out.extend(self.tools.feed(text) if kind == "content" else [(kind, text)])
        if final:
            out.extend(self.tools.finish())
        return out
