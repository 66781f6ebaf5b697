"""Terminal output of a reply: markdown streamed block by block, reasoning apart, a one-line status.

No full-screen redraw and no `rich.Live`. Text is written to the terminal as it streams; a markdown
block (paragraph, list, fenced code, heading, quote, table) is shown as plain text while it grows,
then, once complete, that plain text is erased (cursor up over its own rows, clear to the end of the
screen) and the block is printed once, rendered by rich's Markdown. Finished blocks are never touched
again, so nothing above the current block flickers or is printed twice. A block taller than the
screen cannot be erased (its top has scrolled away), so it is rendered in pieces before it gets there.

When the output is not a terminal (a pipe, a file), blocks are printed rendered when complete and
nothing is ever erased.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markdown import CodeBlock, Markdown
from rich.markup import escape
from rich.style import Style
from rich.syntax import Syntax
from rich.text import Text

from ..harmony import MessageDone, TextDelta, ToolCall

# ---------------------------------------------------------------------------------------------------
# Sanitizing model text: it must not move the cursor or change the terminal's state.
# ---------------------------------------------------------------------------------------------------


def plural(n: int, word: str) -> str:
    """ "1 token", "2 tokens", "1,024 tokens"."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize(text: str) -> str:
    """Model text made safe to write to a terminal: tabs become spaces, other control characters
    (escape sequences, carriage returns, bells) are dropped; newlines are kept."""
    return _CONTROL.sub("", text.replace("\t", "    ").replace("\r\n", "\n"))


# ---------------------------------------------------------------------------------------------------
# Markdown block splitting
# ---------------------------------------------------------------------------------------------------

FENCE_RE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
HEADING_RE = re.compile(r"^ {0,3}#{1,6}(\s|$)")
RULE_RE = re.compile(r"^ {0,3}([-*_])(\s*\1){2,}\s*$")
SETEXT_RE = re.compile(r"^ {0,3}(=+|-+)\s*$")
LIST_RE = re.compile(r"^ {0,3}([-+*]|\d{1,9}[.)])(\s|$)")


@dataclass
class Block:
    """A complete markdown block. `continued`: a later piece of a block too tall to show at once."""

    text: str
    kind: str = "text"  # "text" (paragraph, list, quote, table), "code", "heading", "rule"
    continued: bool = False
    more: bool = False  # a piece of a block split by force(): the rest follows


class BlockSplitter:
    """Cuts streamed markdown into complete blocks.

    feed(text) returns the blocks that text completed; `pending` is the text of the block still
    growing; flush() ends the stream. A blank line ends a paragraph; a fenced code block ends at its
    closing fence (blank lines inside are kept); a heading or a rule is a block of one line; a list
    followed by a blank line waits for the next line: an indented line or another item continues it
    (a loose list), anything else starts a new block.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []  # complete lines of the current block (for code: its body)
        self._partial = ""  # the line being written
        self._fence: tuple[str, int] | None = None  # (fence character, length) inside fenced code
        self._opener = ""  # the opening fence line
        self._blank = False  # a list was followed by a blank line: decide with the next line
        self._continued = False  # the current block is the rest of a block split by force()

    # -- input --------------------------------------------------------------------------------------

    def feed(self, text: str) -> list[Block]:
        out: list[Block] = []
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self._line(line, out)
        return out

    def flush(self) -> list[Block]:
        """The end of the text: whatever is left is a block (an open code fence is closed)."""
        out: list[Block] = []
        if self._partial:
            self._line(self._partial, out)
            self._partial = ""
        if self._fence is not None:
            self._emit_code(out)
        else:
            self._emit_text(out)
        self._blank = False
        return out

    def force(self) -> list[Block]:
        """Emit the complete lines of the current block now (it is too tall to wait for its end).

        A code block is cut into closed fences that each render as code; the rest continues the block.
        """
        out: list[Block] = []
        if self._fence is not None:
            if self._lines:
                self._emit_code(out, keep_open=True)
        elif self._lines:
            self._emit_text(out, keep_continued=True)
        return out

    @property
    def pending(self) -> str:
        """The text of the incomplete block, as it came in."""
        lines = list(self._lines)
        if self._fence is not None and not self._continued:
            lines.insert(0, self._opener)
        if self._blank:
            lines.append("")
        text = "".join(line + "\n" for line in lines)
        return text + self._partial

    @property
    def in_code(self) -> bool:
        return self._fence is not None

    # -- lines --------------------------------------------------------------------------------------

    def _is_list(self) -> bool:
        return any(LIST_RE.match(line) for line in self._lines)

    def _line(self, line: str, out: list[Block]) -> None:
        if self._fence is not None:
            char, length = self._fence
            stripped = line.strip()
            if (
                len(line) - len(line.lstrip(" ")) <= 3
                and stripped.startswith(char * length)
                and set(stripped) == {char}
            ):
                self._emit_code(out)
            else:
                self._lines.append(line)
            return
        if not line.strip():
            if not self._lines:
                return  # blank lines between blocks
            if self._is_list():
                self._blank = True
            else:
                self._emit_text(out)
            return
        if self._blank:
            self._blank = False
            if line.startswith((" ", "\t")) or LIST_RE.match(line):
                self._lines.append("")  # a loose list goes on
            else:
                self._emit_text(out)
        fence = FENCE_RE.match(line)
        if fence and not (fence.group(2)[0] == "`" and "`" in fence.group(3)):
            in_list_item = self._is_list() and fence.group(1)
            if not in_list_item:
                self._emit_text(out)
                self._fence = (fence.group(2)[0], len(fence.group(2)))
                self._opener = line.strip()
                return
        if HEADING_RE.match(line) and not (self._is_list() and line.startswith(" ")):
            self._emit_text(out)
            out.append(Block(line.strip(), "heading"))
            return
        if self._lines and SETEXT_RE.match(line) and not self._is_list():
            self._lines.append(line)  # "Title\n---": a heading, not a rule
            self._emit_text(out, kind="heading")
            return
        if RULE_RE.match(line):
            self._emit_text(out)
            out.append(Block(line.strip(), "rule"))
            return
        self._lines.append(line)

    def _emit_text(self, out: list[Block], kind: str = "text", keep_continued: bool = False) -> None:
        if self._lines:
            out.append(Block("\n".join(self._lines), kind, self._continued, more=keep_continued))
        self._lines = []
        self._continued = keep_continued

    def _emit_code(self, out: list[Block], keep_open: bool = False) -> None:
        fence_char, length = self._fence or ("`", 3)
        closing = fence_char * length
        body = "".join(line + "\n" for line in self._lines)
        out.append(Block(f"{self._opener}\n{body}{closing}", "code", self._continued, more=keep_open))
        self._lines = []
        if keep_open:
            self._continued = True
        else:
            self._fence = None
            self._continued = False


# ---------------------------------------------------------------------------------------------------
# Terminal writing
# ---------------------------------------------------------------------------------------------------


def rows_above(text: str, width: int) -> int:
    """Rows the cursor moves down while `text` is written from column 0 of a `width`-column terminal
    (lines wrap at the width; a line of exactly the width leaves the cursor on its last row)."""
    width = max(1, width)
    lines = text.split("\n")
    rows = sum(max(1, math.ceil(cell_len(line) / width)) for line in lines[:-1])
    return rows + max(0, math.ceil(cell_len(lines[-1]) / width) - 1)


_TRAILING_SPACES = re.compile(r" +((?:\x1b\[[0-9;]*m)*)$")


def _strip_blank_edges(lines: list[str]) -> list[str]:
    def blank(line: str) -> bool:
        return not Text.from_ansi(line).plain.strip()

    while lines and blank(lines[0]):
        lines.pop(0)
    while lines and blank(lines[-1]):
        lines.pop()
    return lines


# Code is shown without a background or padding, in the terminal's own palette (ANSI colours), so
# that what a user selects and copies is exactly the code: rich's default code block pads every line
# with a space on the left and spaces to the full width on the right.
CODE_THEME = "ansi_dark"


def render_code(console: Console, code: str, lexer: str = "text", theme: str = CODE_THEME) -> list[str]:
    """The lines of `code`, highlighted, exactly as written: no padding, no trailing spaces added, and
    no line breaks added (a long line is wrapped by the terminal, so a copy joins it back)."""
    try:
        text = Syntax(code, lexer or "text", theme=theme, background_color="default").highlight(code)
    except Exception:  # an unknown lexer name and the like: plain is fine
        text = Text(code)
    if text.plain.rstrip("\n") != code.rstrip("\n"):
        text = Text(code)  # never show something other than the code
    lines = text.split("\n", allow_blank=True)[: code.count("\n") + 1]
    out = []
    for line in lines:
        with console.capture() as capture:
            console.print(line, soft_wrap=True, end="")
        out.append(capture.get())
    return out


class _CodeBlock(CodeBlock):
    """A code block inside other markdown (a list item, a quote): no padding, no background."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        code = str(self.text).rstrip()
        yield Syntax(code, self.lexer_name, theme=self.theme, word_wrap=True, background_color="default")


class _Markdown(Markdown):
    elements = {**Markdown.elements, "fence": _CodeBlock, "code_block": _CodeBlock}


def code_of(block_text: str) -> tuple[str, str]:
    """(lexer name, body) of a fenced block's text as BlockSplitter makes it: opener, body, closer."""
    lines = block_text.split("\n")
    opener = lines[0].strip().lstrip("`~").strip()
    return (opener.split()[0] if opener else "text"), "\n".join(lines[1:-1])


class MarkdownStream:
    """Streams one message's markdown to the console (see the module docstring)."""

    def __init__(
        self,
        console: Console,
        *,
        markdown: bool = True,
        live: bool | None = None,
        code_theme: str = CODE_THEME,
    ) -> None:
        self.console = console
        self.markdown = markdown
        self.live = console.is_terminal if live is None else live
        self.code_theme = code_theme
        self.splitter = BlockSplitter()
        self._shown = ""  # what is on screen for the pending block (erasable)
        self._blocks = 0  # blocks printed
        self._raw_open = False  # plain mode: the last line written has no newline yet
        # A single line taller than the screen cannot be erased: that block stays as streamed.
        self._frozen: str | None = None  # what of it is on screen

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()

    def feed(self, text: str) -> None:
        text = sanitize(text)
        if not text:
            return
        if not self.markdown:
            self._write(text)
            self._raw_open = not text.endswith("\n")
            return
        self._print_blocks(self.splitter.feed(text))
        if self.live:
            self._show(self.splitter.pending)

    def finish(self) -> None:
        """The message ended: render what is left."""
        if not self.markdown:
            if self._raw_open:
                self._write("\n")
                self._raw_open = False
            return
        self._print_blocks(self.splitter.flush())

    @property
    def printed(self) -> bool:
        return bool(self._blocks or self._shown or self._raw_open)

    # -- the erasable pending block ------------------------------------------------------------------

    def _display(self, pending: str) -> str:
        if not pending:
            return ""
        return ("\n" if self._blocks else "") + pending

    def _show(self, pending: str) -> None:
        if self._frozen is not None:
            if pending.startswith(self._frozen):
                self._write(pending[len(self._frozen) :])
                self._frozen = pending
            return
        display = self._display(pending)
        if display.startswith(self._shown):
            self._write(display[len(self._shown) :])
        else:
            self._erase()
            self._write(display)
        self._shown = display
        limit = max(4, self.console.height - 4)
        if rows_above(display, self.console.width) >= limit:
            blocks = self.splitter.force()
            if blocks:
                self._print_blocks(blocks)
                self._show(self.splitter.pending)
            else:  # one line fills the screen: leave it as it streams
                self._frozen = pending
                self._shown = ""
                self._blocks += 1

    def _erase(self) -> None:
        if not self._shown:
            return
        up = rows_above(self._shown, self.console.width)
        self._write("\r" + (f"\x1b[{up}A" if up else "") + "\x1b[J")
        self._shown = ""

    # -- finished blocks --------------------------------------------------------------------------------

    def render_block(self, block: Block) -> list[str]:
        """The block's lines as the console would print them (ANSI styles when a terminal)."""
        if block.kind == "code":
            lexer, code = code_of(block.text)
            return render_code(self.console, code, lexer, self.code_theme)
        with self.console.capture() as capture:
            self.console.print(_Markdown(block.text, code_theme=self.code_theme), crop=True)
        lines = capture.get().rstrip("\n").split("\n")
        # No padding spaces at the ends of lines (they would be copied with the text).
        return [_TRAILING_SPACES.sub(r"\1", line) for line in _strip_blank_edges(lines)]

    def _print_blocks(self, blocks: list[Block]) -> None:
        for block in blocks:
            if self._frozen is not None:  # the block shown as it streamed: only its end is missing
                whole = block.text + "\n"
                self._write(whole[len(self._frozen) :] if whole.startswith(self._frozen) else "\n")
                self._frozen = None
                continue
            self._erase()
            self._print_block(block)

    def _print_block(self, block: Block) -> None:
        lines = self.render_block(block)
        if not lines:
            return
        separator = "\n" if self._blocks and not block.continued else ""
        self._write(separator + "".join(line + "\n" for line in lines))
        self._blocks += 1


class WordWrap:
    """Streamed text cut into lines at spaces, for text written straight to the terminal (which would
    break a line in the middle of a word). A word is held back until the space after it arrives; the
    spaces where a line is broken are dropped, so no line ends with them. A word longer than the
    width is left to the terminal."""

    def __init__(self, width: int) -> None:
        self.width = max(10, width)
        self.column = 0  # cells on the current row
        self.spaces = 0  # spaces seen after the last word, not written yet
        self.word = ""

    def resize(self, width: int) -> None:
        width = max(10, width)
        if width != self.width:
            self.width = width
            # The terminal rewraps the row being written: the column is where it now ends.
            if self.column > width:
                self.column = (self.column - 1) % width + 1

    def feed(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            if ch == "\n":
                out.append(self._word())
                out.append("\n")
                self.column, self.spaces = 0, 0
            elif ch == " ":
                out.append(self._word())
                self.spaces += 1
            else:
                self.word += ch
        return "".join(out)

    def flush(self) -> str:
        return self._word()

    def _word(self) -> str:
        if not self.word:
            return ""
        word, self.word = self.word, ""
        n = cell_len(word)
        if self.column and self.column + self.spaces + n > self.width:
            out = "\n" + word
            self.column = n
        else:
            out = " " * self.spaces + word
            self.column += self.spaces + n
        self.spaces = 0
        if self.column > self.width:  # a word longer than a row: the terminal wrapped it
            self.column = (self.column - 1) % self.width + 1
        return out


class StatusLine:
    """One dim line at the cursor, rewritten in place (carriage return + clear line). Terminals only."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.shown = False
        self._last = 0.0

    def show(self, text: str, throttle: float = 0.0) -> None:
        if not self.console.is_terminal:
            return
        now = time.monotonic()
        if throttle and self.shown and now - self._last < throttle:
            return
        self._last = now
        width = max(10, self.console.width - 1)
        text = sanitize(text).replace("\n", " ")
        if cell_len(text) > width:
            text = Text(text)
            text.truncate(width, overflow="ellipsis")
            text = text.plain
        styled = Style(dim=True).render(text, color_system=self.console.color_system)
        self.console.file.write("\r\x1b[2K" + styled)
        self.console.file.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.console.file.write("\r\x1b[2K")
            self.console.file.flush()
            self.shown = False


# ---------------------------------------------------------------------------------------------------
# One reply on screen
# ---------------------------------------------------------------------------------------------------

REASONING_MODES = ("summary", "show", "hide")
PREFILL_SHOWN_FROM = 512  # prompt tokens: below this, processing them is too quick to report


def _compact_json(text: str, limit: int = 240) -> str:
    import json

    try:
        text = json.dumps(json.loads(text), ensure_ascii=False)
    except (ValueError, TypeError):
        text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ReplyView:
    """Turns a reply's events into terminal output.

    answer (final, and commentary preambles): markdown, block by block.
    reasoning (analysis): "summary" — a dim status line "thinking… (N tokens)" while it streams, then
    one dim line "thought for S s (N tokens)"; "show" — streamed in full, dim; "hide" — nothing kept.
    tool calls: a status line while the arguments stream, then one line with the call.
    """

    def __init__(self, console: Console, reasoning: str = "summary", markdown: bool = True) -> None:
        self.console = console
        self.reasoning = reasoning
        self.markdown = markdown
        self.status = StatusLine(console)
        self.section: str | None = None  # "reasoning" | "answer" | "call"
        self.stream: MarkdownStream | None = None
        self.printed = False  # anything permanent printed in this reply
        self.thinking_tokens = 0
        self.thinking_text = ""
        self._thinking_start = 0.0
        self._thinking_seconds = 0.0
        self._call_tokens = 0
        self._dim = Style(dim=True)
        self._wrap: WordWrap | None = None  # reasoning shown in full, as it streams
        self._prefill_start = 0.0
        self.prefill_total = 0  # new prompt tokens of this reply (reported by the prefill)

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()

    def _begin(self, section: str) -> None:
        if self.section == section:
            return
        self._end_section()
        if self.printed and section != "call":
            self._write("\n")
        self.section = section
        if section == "reasoning":
            self._thinking_start = time.monotonic()
            self._wrap = WordWrap(self.console.width)
        elif section == "answer":
            self.stream = MarkdownStream(self.console, markdown=self.markdown)

    def _end_section(self) -> None:
        section, self.section = self.section, None
        if section == "answer" and self.stream is not None:
            self.stream.finish()
            self.printed = self.printed or self.stream.printed
            self.stream = None
        elif section == "reasoning":
            self._thinking_seconds += time.monotonic() - self._thinking_start
            self.status.clear()
            if self.reasoning == "show":
                if self._wrap is not None:
                    self._write_dim(self._wrap.flush())
                if not self.thinking_text.endswith("\n"):
                    self._write("\n")
                self.printed = True
            elif self.reasoning == "summary":
                tokens = plural(self.thinking_tokens, "token")
                self.line(f"thought for {self._thinking_seconds:.1f} s ({tokens})")
        elif section == "call":
            self.status.clear()

    def line(self, text: str, style: str = "dim") -> None:
        """A permanent line of text (not markup)."""
        self.status.clear()
        self.console.print(Text(sanitize(text), style=style), soft_wrap=True)
        self.printed = True

    # -- events -------------------------------------------------------------------------------------

    def event(self, event: object) -> None:
        if isinstance(event, TextDelta):
            if event.recipient and event.recipient not in ("all", "assistant", "user"):
                self._call_arguments(event)
            elif event.channel == "analysis":
                self._reasoning(event.text)
            else:
                self._answer(event.text)
        elif isinstance(event, ToolCall):
            self._end_section()
        elif isinstance(event, MessageDone):
            if self.section in ("answer", "call"):
                self._end_section()

    def _reasoning(self, text: str) -> None:
        self._begin("reasoning")
        self.thinking_tokens += 1
        self.thinking_text += text
        if self.reasoning == "show":
            clean = sanitize(text)
            if self._wrap is not None and self.console.is_terminal:
                self._wrap.resize(self.console.width)  # the terminal may have been resized meanwhile
                clean = self._wrap.feed(clean)
            self._write_dim(clean)
        else:
            self.status.show(f"thinking… ({plural(self.thinking_tokens, 'token')})", throttle=0.08)

    def _write_dim(self, text: str) -> None:
        if text and self.console.is_terminal and self.console.color_system:
            text = self._dim.render(text, color_system=self.console.color_system)
        if text:
            self._write(text)

    def prefill(self, done: int, total: int) -> None:
        """Progress of a long prompt's processing, on the status line (a short one shows nothing)."""
        now = time.monotonic()
        self.prefill_total = total
        if done == 0:
            self._prefill_start = now
        if total < PREFILL_SHOWN_FROM or done >= total:
            self.status.clear()
            return
        elapsed = now - self._prefill_start
        rate = f" · {done / elapsed:,.0f} tok/s" if done and elapsed > 0 else ""
        self.status.show(
            f"reading the prompt: {done:,}/{total:,} tokens ({100 * done // total}%){rate} · Ctrl-C stops"
        )

    def _answer(self, text: str) -> None:
        self._begin("answer")
        assert self.stream is not None
        self.stream.feed(text)

    def _call_arguments(self, event: TextDelta) -> None:
        self._begin("call")
        self._call_tokens += 1
        name = event.recipient.removeprefix("functions.") if event.recipient else "tool"
        self.status.show(f"calling {name}… ({plural(self._call_tokens, 'token')})", throttle=0.08)

    def show_call(self, call: ToolCall) -> None:
        """Print a tool call (before it runs)."""
        self._end_section()
        if call.recipient == "python" or call.name == "python":
            self.console.print(Text("⚙ python", style="bold cyan"))
            lines = render_code(self.console, sanitize(call.arguments).strip("\n"), "python")
            self._write("".join(line + "\n" for line in lines))
        else:
            args = _compact_json(call.arguments)
            self.console.print(
                Text.assemble(("⚙ ", "bold cyan"), (call.name, "bold cyan"), (f"({args})", "cyan")),
                soft_wrap=True,
            )
        self.printed = True

    def show_result(self, text: str, ok: bool = True, limit: int = 600) -> None:
        text = sanitize(text).strip("\n")
        if len(text) > limit:
            text = text[:limit] + f"… ({len(text) - limit} more characters)"
        style = "dim" if ok else "red"
        self.console.print(Text.assemble(("↳ ", style), (text or "(no output)", style)), soft_wrap=True)
        self.printed = True

    def finish(self) -> None:
        self._end_section()
        self.status.clear()


def print_dim(console: Console, text: str) -> None:
    console.print(f"[dim]{escape(text)}[/dim]", soft_wrap=True)


def print_markdown(console: Console, text: str) -> None:
    stream = MarkdownStream(console, live=False)
    stream.feed(text)
    stream.finish()


if __name__ == "__main__":  # a quick look: python -m oss_mlx.chat.render < file.md
    console = Console(highlight=False)
    stream = MarkdownStream(console)
    for chunk in iter(lambda: sys.stdin.read(7), ""):
        stream.feed(chunk)
        time.sleep(0.01)
    stream.finish()
