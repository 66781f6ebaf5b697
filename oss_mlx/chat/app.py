"""`oss-mlx chat`: a terminal chat with gpt-oss.

    oss-mlx chat [--model M] [--reasoning-effort low|medium|high] [--system TEXT]
                 [--reasoning summary|show|hide] [--tools FILE] [--python] [--max-tokens N]
                 [--temperature T] [--top-p P] [--seed S] [--history FILE] [--no-autosave]

One `Session` holds the conversation and its KV cache: each turn prefills only what the cache does
not hold yet. Replies stream as markdown, block by block (render.py); the chain of thought is shown
apart. Ctrl-C stops a reply and keeps what was said; the conversation is saved after every turn.
docs/CHAT.md is the user's guide.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .. import cli_args
from ..harmony import REASONING_EFFORTS, Message, TextDelta, Tool, ToolCall, render_developer, render_system
from . import commands
from .clipboard import copy_text
from .guard import InterruptGuard, LoopDetector, is_interactive, no_echo
from .history import (
    ChatFileError,
    data_dir,
    load_conversation,
    new_autosave_path,
    save_conversation,
)
from .render import REASONING_MODES, BlockSplitter, ReplyView, code_of, print_markdown
from .tools import FunctionTool, PythonSandbox, ToolFileError, load_tools, python_system_section

MAX_TOOL_ROUNDS = 12
DEFAULT_MAX_TOKENS = 8192
PROMPT = ">>> "


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def format_stats(stats: Any, limit: int | None) -> str:
    """The line printed after each reply: time to first token, speed, tokens, prefill, context, memory.
    A reply stopped before its first token says how far the prompt got instead."""
    if stats.generated_tokens:
        parts = [
            f"{stats.time_to_first_token:.2f} s to first token",
            f"{stats.generation_tps:.1f} tok/s",
            f"{stats.generated_tokens:,} tokens",
            f"prefilled {stats.prefilled_tokens:,}/{stats.prompt_tokens:,}",
        ]
    else:
        parts = [
            f"no reply · prefilled {stats.prefilled_tokens:,}/{stats.prompt_tokens:,} in "
            f"{stats.prompt_seconds:.1f} s ({stats.prompt_tps:,.0f} tok/s)"
        ]
    parts.append(f"context {stats.context_tokens:,}" + (f"/{limit:,}" if limit else ""))
    if stats.peak_memory_gb:
        parts.append(f"peak {stats.peak_memory_gb:.2f} GB")
    if stats.finish_reason not in ("stop", "tool_call"):
        parts.append(stats.finish_reason)
    return " · ".join(parts)


def ensure_consistent(session: Any) -> bool:
    """After an interruption at an odd moment: the cache must hold exactly `cached_tokens`.

    If it does not, the cache is dropped (the history is kept; the next turn prefills it all).
    Returns whether the cache was kept.
    """
    try:
        offsets = {c.offset for c in session.cache}
        if len(offsets) <= 1 and (offsets or {0}).pop() == len(session.cached_tokens):
            return True
    except Exception:
        pass
    session.cache = session.model.make_cache()
    session.cached_tokens = []
    return False


def today() -> str:
    """The conversation's start date as OpenAI's reference chat writes it in the system message."""
    import datetime

    return datetime.datetime.now().strftime("%Y-%m-%d")


def _valid_date(value: Any) -> bool:
    import datetime

    try:
        return isinstance(value, str) and datetime.date.fromisoformat(value).isoformat() == value
    except ValueError:
        return False


def _short(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def context_limit(model: Any) -> int | None:
    """max_position_embeddings, lowered to what fits in memory when the memory planner knows."""
    info = getattr(model, "info", None)
    config = getattr(info, "config", None)
    if config is None:
        return None
    limit = config.max_position_embeddings
    try:
        from ..memory import Machine, MemoryPlan

        raw = getattr(info, "raw_config", {}) or {}
        section = raw.get("oss_mlx") or {}
        plan = MemoryPlan(
            config,
            section.get("preset") or "reference",
            quantization=section.get("quantization") or None,
        )
        fits = plan.max_context(Machine.detect().working_set_bytes)
        if fits > 0:
            limit = min(limit, fits)
    except Exception:  # no planner, or it cannot tell: the model's own limit
        pass
    return limit


def prepare_model(model: str, console: Console) -> Path:
    """The folder to load: a local folder as is; a hub id (the default, openai/gpt-oss-20b) by the
    model store's rule (its converted copy, else the Hugging Face cache, else downloaded and
    converted once into the store, announced here)."""
    from ..model_store import resolve

    return resolve(model, say=lambda text: console.print(Text(text, style="bold")))


def _import_sampler() -> None:
    try:
        import mlx_lm.sample_utils  # noqa: F401
    except Exception:  # the reply will say what is wrong, in words
        pass


def install_scripted_replies(path: str, tokenizer: Any) -> None:
    """TEST HOOK, only when OSS_MLX_SCRIPTED_REPLIES names a JSON file: a list of harmony completions
    (strings, e.g. "<|channel|>final<|message|>Hi!<|return|>"), one per reply; null entries, and
    replies past the end of the list, sample for real. The model still runs (prefill, decode, cache);
    only the sampler's choice is replaced, as tests/test_session.py's `scripted()` does."""
    from ..generation import SamplingOptions
    from ..server.scripted import scripted_pick  # a token a constraint (/json) forbids is not taken

    queue = list(json.loads(Path(path).read_text()))
    real = SamplingOptions.sampler

    def sampler(self: SamplingOptions):
        entry = queue.pop(0) if queue else None
        if entry is None:
            return real(self)
        script = iter(tokenizer.encode(entry, allow_special=True))
        return lambda logprobs: scripted_pick(logprobs, next(script, tokenizer.RETURN))

    SamplingOptions.sampler = sampler


# ---------------------------------------------------------------------------------------------------
# The chat
# ---------------------------------------------------------------------------------------------------


class ChatApp:
    def __init__(
        self,
        session: Any,
        console: Console,
        *,
        model_name: str = "",
        reasoning: str = "summary",
        markdown: bool = True,
        sampling: dict[str, Any] | None = None,
        tools: list[FunctionTool] | None = None,
        python: PythonSandbox | None = None,
        autosave: Path | None = None,
        context_limit: int | None = None,
    ) -> None:
        self.session = session
        self.console = console
        self.model_name = model_name
        self.reasoning = reasoning
        self.markdown = markdown
        self.sampling: dict[str, Any] = dict(sampling or {})
        self.tools = {t.name: t for t in tools or []}
        self.python = python
        self.autosave_path = autosave
        self.limit = context_limit
        self.multiline = False
        self.turn_no = sum(m.role == "user" for m in session.messages)
        self.rows: list[tuple[str, Any]] = []  # (turn label, GenerationStats) per reply
        self.last_analysis = ""
        self._autosave_warned = False
        self._prompt = None
        self._quit_armed = False  # Ctrl-C on an empty line was pressed: a second one quits
        self.session.tools = [Tool(t.name, t.description, t.parameters) for t in self.tools.values()]
        self.json_schema: dict | None = None  # /json: the answers follow this schema (enforced)
        self.json_file = ""

    # -- messages the model sees ----------------------------------------------------------------------

    def system_message(self) -> str:
        text = render_system(
            self.session.reasoning_effort,
            current_date=self.session.current_date,
            has_function_tools=bool(self.session.tools),
        )
        if self.python is not None:
            at = text.index("# Valid channels")
            text = text[:at] + python_system_section(self.python.timeout) + "\n\n" + text[at:]
        return text

    def developer_message(self) -> str | None:
        if self.session.instructions is None and not self.session.tools:
            return None
        return render_developer(self.session.instructions, self.session.tools)

    def _sync_system(self) -> None:
        """With the python tool, the system message is ours (Session renders only function tools)."""
        msgs = self.session.messages
        msgs[:] = [m for m in msgs if m.role != "system"]
        if self.python is not None:
            msgs.insert(0, Message("system", self.system_message()))

    def settings(self) -> dict[str, Any]:
        return {
            "reasoning_effort": self.session.reasoning_effort,
            "instructions": self.session.instructions,
            "tools": sorted(self.tools),
            "python": self.python is not None,
            "sampling": self.sampling,
            "current_date": self.session.current_date,
        }

    # -- output helpers ---------------------------------------------------------------------------------

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(Text(text, style=style), soft_wrap=True)

    def error(self, text: str) -> None:
        self.console.print(Text(text, style="red"), soft_wrap=True)

    # -- saving -----------------------------------------------------------------------------------------

    def save(self, path: Path, pending: list[Message] | None = None) -> None:
        self._sync_system()
        save_conversation(
            path,
            self.session.messages + list(pending or []),
            self.settings(),
            model=self.model_name,
            system_message=self.system_message(),
            developer_message=self.developer_message(),
        )

    def autosave(self, pending: list[Message] | None = None) -> None:
        """Save to the autosave file; `pending`: messages not in the session yet (a question)."""
        messages = self.session.messages + list(pending or [])
        if self.autosave_path is None or not any(m.role != "system" for m in messages):
            return
        guard = InterruptGuard()  # a Ctrl-C now waits: the save is not cut half-way
        try:
            with guard, guard.hold():
                self.save(self.autosave_path, pending)
        except OSError as e:
            if not self._autosave_warned:
                self.error(f"autosave to {self.autosave_path} failed: {e}")
                self._autosave_warned = True

    # -- input ------------------------------------------------------------------------------------------

    def _toolbar(self):
        used = self.session.cache.offset if self.session.cache is not None else 0
        ctx = f"{used:,}" + (f"/{self.limit:,}" if self.limit else "")
        keys = (
            "multi-line: Enter new line, Alt+Enter send"
            if self.multiline
            else "Alt+Enter or Ctrl-J: new line"
        )
        return (  # /help before the keys: a narrow terminal cuts the end of the line
            f" {self.model_name} · effort {self.session.reasoning_effort} · reasoning {self.reasoning}"
            f" · context {ctx} · /help · {keys}"
        )

    def _make_prompt(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        kb = KeyBindings()
        multi = Condition(lambda: self.multiline)

        @kb.add("enter", filter=~multi)
        def _submit(event):
            buffer = event.current_buffer
            state = buffer.complete_state
            if state is not None and state.current_completion is not None:
                buffer.apply_completion(state.current_completion)
                return
            buffer.validate_and_handle()

        # Alt+Enter arrives as Escape then Enter: a new line, or in /multi mode (where Enter is the
        # new line) it sends.
        @kb.add("escape", "enter", filter=~multi)
        @kb.add("c-j")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        @kb.add("escape", "enter", filter=multi)
        def _submit_multi(event):
            event.current_buffer.validate_and_handle()

        @kb.add("c-c")
        def _interrupt(event):
            buffer = event.current_buffer
            if buffer.text:
                buffer.reset()
            elif self._quit_armed:  # the second Ctrl-C in a row on an empty line
                event.app.exit(exception=EOFError())
            else:
                event.app.exit(exception=KeyboardInterrupt())

        try:
            folder = data_dir()
            folder.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(folder / "input_history"))
        except OSError:
            history = InMemoryHistory()
        session = PromptSession(
            history=history,
            completer=commands.SlashCompleter(),
            complete_while_typing=True,
            key_bindings=kb,
            multiline=True,
            bottom_toolbar=self._toolbar,
            prompt_continuation=lambda width, line, soft: "." * (width - 1) + " ",
            enable_history_search=False,
        )

        def typed(_buffer) -> None:
            self._quit_armed = False

        session.default_buffer.on_text_changed += typed
        return session

    def read(self) -> str:
        """The next input; EOFError at the end (Ctrl-D, Ctrl-C on an empty line, end of stdin)."""
        if not is_interactive():
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
        if self._prompt is None:
            self._prompt = self._make_prompt()
        return self._prompt.prompt(PROMPT)

    def ask(self, question: str) -> str:
        """A one-off answer from the user (a tool's result); KeyboardInterrupt / EOFError cancel."""
        if not is_interactive():
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
        from prompt_toolkit import prompt

        return prompt(question)

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self) -> int:
        while True:
            try:
                line = self.read()
            except EOFError:
                return self.quit()
            except KeyboardInterrupt:
                # Ctrl-C on an empty line (or one meant for a reply that had already stopped): the
                # chat ends only when it is pressed again, and says so.
                self._quit_armed = True
                self.say("(Ctrl-C again quits; so do Ctrl-D and /exit)")
                continue
            self._quit_armed = False
            if not line.strip():
                continue
            keep = True
            try:
                keep = self.handle(line)
            except KeyboardInterrupt:
                self.say("interrupted")
            except Exception as e:  # a bug must not end the chat or lose the conversation
                self.error(f"error: {type(e).__name__}: {e}")
                if cli_args.debug_requested():
                    traceback.print_exc()
                ensure_consistent(self.session)
            self.autosave()
            if not keep:
                return self.quit()

    def quit(self) -> int:
        guard = InterruptGuard()  # one more Ctrl-C while quitting changes nothing
        with guard, guard.hold():
            self.autosave()
            saved = self.autosave_path is not None and self.autosave_path.is_file()
            self.say(f"bye: the conversation is saved in {self.autosave_path}" if saved else "bye")
        return 0

    def handle(self, line: str) -> bool:
        """One input line: a command or a message. False: quit."""
        parsed = commands.parse_command(line)
        if parsed is None:
            self.turn(commands.unescape(line))
            return True
        name, arg = parsed
        command = commands.find(name)
        if command is None:
            options = commands.candidates(name)
            if options:
                listed = " or ".join(f"/{o}" for o in options)
                self.error(f"/{name} could be {listed}: type more of the name")
            else:
                self.error(f"unknown command /{name} — /help lists the commands (// sends a leading slash)")
            return True
        return getattr(self, f"cmd_{command.name}")(arg) is not False

    # -- a turn -----------------------------------------------------------------------------------------

    def turn(self, text: str | None, label: str | None = None) -> None:
        """A user message (or None: reply again to the history), with tool calls until the answer."""
        if text is not None:
            self.turn_no += 1
        label = label or str(self.turn_no)
        self.last_analysis = ""
        if text is not None:
            self.autosave([Message("user", text)])  # a crash while it answers loses nothing
        prompt = text
        for rounds in range(MAX_TOOL_ROUNDS + 1):
            reply, stopped = self.reply(prompt, label if rounds == 0 else f"{label}.{rounds + 1}")
            prompt = None
            if stopped or reply is None or reply.stats.finish_reason != "tool_call" or not reply.tool_calls:
                return
            if rounds == MAX_TOOL_ROUNDS:
                self.say(f"stopped after {MAX_TOOL_ROUNDS} tool calls in a row", style="yellow")
                return
            if not self.run_tool(reply.tool_calls[-1]):
                return
            self.autosave()

    def reply(self, prompt: str | None, label: str) -> tuple[Any, str | None]:
        """Stream one reply. Returns (Reply or None, why it was stopped: None, "interrupted", "loop")."""
        from ..session import Done

        self._sync_system()
        view = ReplyView(self.console, self.reasoning, self.markdown)
        detector = LoopDetector()
        before = len(self.session.turn_stats)
        stopped = None
        reply = None
        guard = InterruptGuard()
        with guard:
            with no_echo():
                constraint = {"json_schema": self.json_schema} if self.json_schema is not None else {}
                events = self.session.send(prompt, on_prefill=view.prefill, **self.sampling, **constraint)
                try:
                    for event in events:
                        guard.streaming = True
                        if isinstance(event, Done):
                            reply = event.reply
                            break
                        view.event(event)
                        if isinstance(event, TextDelta) and detector.feed((event.channel, event.text)):
                            stopped = "loop"
                            break
                        if guard.requested:
                            stopped = "interrupted"
                            break
                except KeyboardInterrupt:
                    stopped = "interrupted"
                finally:
                    with guard.hold():
                        events.close()
                        view.finish()
                if guard.requested and stopped is None and reply is None:
                    stopped = "interrupted"
            # More Ctrl-C presses while this reply is wrapped up are absorbed: they were meant for it.
            with guard.hold():
                return self._after_reply(view, detector, label, before, reply, stopped)

    def _after_reply(
        self,
        view: ReplyView,
        detector: LoopDetector,
        label: str,
        before: int,
        reply: Any,
        stopped: str | None,
    ) -> tuple[Any, str | None]:
        ensure_consistent(self.session)
        stats = self.session.turn_stats[-1] if len(self.session.turn_stats) > before else None
        if reply is None and stats is not None:
            reply = self.session.last_reply
        self.last_analysis += view.thinking_text
        if stopped == "interrupted":
            if stats is not None and not stats.generated_tokens:
                self.say(
                    f"⏹ stopped (Ctrl-C) while reading the prompt: {stats.prefilled_tokens:,} of "
                    f"{view.prefill_total:,} new tokens were processed (kept in the cache); no reply was "
                    "produced. Your message is kept: /regen answers it, /undo removes it",
                    style="yellow",
                )
            else:
                self.say("⏹ stopped (Ctrl-C); the reply so far is kept", style="yellow")
        elif stopped == "loop":
            self.say(
                f"⏹ stopped: the model was repeating itself (a {detector.period}-token loop); "
                "/regen to try again",
                style="yellow",
            )
        if stats is not None:
            if stopped and stats.finish_reason == "length":
                stats.finish_reason = "interrupted"
            self.rows.append((label, stats))
            self.say(format_stats(stats, self.limit))
            if self.limit and stats.context_tokens > 0.9 * self.limit:
                self.say("the context is nearly full: /clear starts a new conversation", style="yellow")
        return reply, stopped

    # -- tools ------------------------------------------------------------------------------------------

    def _tool_message(self, call: ToolCall, content: str) -> None:
        if call.recipient.startswith("functions."):
            self.session.add_tool_result(call.name, content)
        else:  # a built-in tool (python, browser...): the author is the tool, on the call's channel
            self.session.messages.append(
                Message("tool", content, channel=call.channel, recipient="assistant", name=call.recipient)
            )

    def run_tool(self, call: ToolCall) -> bool:
        """Run a tool call and record its result. False: the user stopped it."""
        view = ReplyView(self.console, self.reasoning, self.markdown)
        view.show_call(call)
        try:
            if call.recipient == "python":
                if self.python is None:
                    ok, out = False, "error: the python tool is not enabled"
                else:
                    with no_echo():
                        result = self.python.run(call.arguments)
                    ok, out = result.ok, result.output
            elif call.recipient.startswith("functions.") and call.name in self.tools:
                tool = self.tools[call.name]
                if tool.function is not None:
                    ok, out = tool.call(call.arguments)
                else:
                    out = self.ask(f"result of {call.name} (Enter sends, Ctrl-C cancels)> ")
                    ok = True
            else:
                known = ", ".join(sorted(self.tools)) or "none"
                ok, out = False, f"error: there is no tool {call.recipient!r} (function tools: {known})"
        except (KeyboardInterrupt, EOFError):
            self._tool_message(call, "error: the user stopped this tool call")
            self.say("⏹ tool call stopped", style="yellow")
            return False
        typed_by_user = ok and call.name in self.tools and self.tools[call.name].function is None
        if not typed_by_user:
            view.show_result(out, ok)
        self._tool_message(call, out)
        return True

    # -- commands ---------------------------------------------------------------------------------------

    def cmd_help(self, arg: str) -> None:
        table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for usage, text in commands.help_rows():
            table.add_row(usage, text)
        self.console.print(table)
        self.say(
            "Enter sends · Alt+Enter (Esc Enter) or Ctrl-J: new line · paste keeps new lines · "
            "Ctrl-C stops a reply; at the prompt it clears the line, twice on an empty line it quits · "
            "Ctrl-D quits"
        )

    def cmd_effort(self, arg: str) -> None:
        if not arg:
            self.say(f"reasoning effort: {self.session.reasoning_effort}")
            return
        value = arg.lower()
        if value not in REASONING_EFFORTS:
            self.error(f"/effort takes one of: {', '.join(REASONING_EFFORTS)}")
            return
        self.session.reasoning_effort = value
        self.say(f"reasoning effort: {value} (from the next reply)")

    def cmd_reasoning(self, arg: str) -> None:
        value = arg.lower()
        if value and value not in REASONING_MODES:
            self.error(f"/reasoning takes one of: {', '.join(REASONING_MODES)}")
            return
        if value:
            self.reasoning = value
            self.say(f"reasoning: {value}")
        if not value or value == "show":
            text = self.last_analysis.strip() or self._analysis_in_history()
            if text:
                self.console.print(Text(text, style="dim"), soft_wrap=True)
            elif not value:
                self.say("no reasoning in the last reply")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.say("system message:", style="bold")
            self.console.print(Text(self.system_message(), style="dim"), soft_wrap=True)
            developer = self.developer_message()
            self.say("developer message:" if developer else "developer message: (none)", style="bold")
            if developer:
                self.console.print(Text(developer, style="dim"), soft_wrap=True)
            return
        if arg.lower() in ("none", "off", "-"):
            self.session.instructions = None
            self.say("instructions removed (from the next reply)")
        else:
            self.session.instructions = arg
            self.say("instructions set (from the next reply)")

    cmd_developer = cmd_system

    def _analysis_in_history(self) -> str:
        """The reasoning of the last turn as kept in the history (after /load, say)."""
        at = self._last_user()
        if at is None:
            return ""
        msgs = self.session.messages[at + 1 :]
        return "\n\n".join(
            m.content for m in msgs if m.role == "assistant" and m.channel == "analysis"
        ).strip()

    def cmd_clear(self, arg: str) -> None:
        self.autosave()
        self.session.reset()
        self.session.current_date = today()
        self.rows.clear()
        self.turn_no = 0
        self.last_analysis = ""
        if self.autosave_path is not None and self.autosave_path.parent.name == "chats":
            self.autosave_path = new_autosave_path(self.autosave_path.parent.parent)
        self.say("new conversation")

    def _last_user(self) -> int | None:
        return next(
            (
                i
                for i in range(len(self.session.messages) - 1, -1, -1)
                if self.session.messages[i].role == "user"
            ),
            None,
        )

    def cmd_regen(self, arg: str) -> None:
        at = self._last_user()
        if at is None:
            self.error("nothing to regenerate")
            return
        del self.session.messages[at + 1 :]
        self.turn(None, label=f"{self.turn_no}r")

    def cmd_undo(self, arg: str) -> None:
        at = self._last_user()
        if at is None:
            self.error("nothing to undo")
            return
        text = self.session.messages[at].content
        del self.session.messages[at:]
        self.turn_no = max(0, self.turn_no - 1)
        self.say(f"removed: {_short(text)}")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.error("/save FILE")
            return
        path = Path(arg).expanduser()
        try:
            self.save(path)
        except OSError as e:
            self.error(f"cannot save to {path}: {e.strerror or e}")
            return
        n = sum(m.role != "system" for m in self.session.messages)
        self.say(f"saved {n} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.error("/load FILE")
            return
        try:
            messages, settings = load_conversation(arg)
        except ChatFileError as e:
            self.error(f"cannot load: {e}")
            return
        self.apply_loaded(messages, settings)
        users = sum(m.role == "user" for m in messages)
        self.say(f"loaded {len(messages)} messages ({users} turns) from {Path(arg).expanduser()}")
        self.show_last_exchange()

    def apply_loaded(self, messages: list[Message], settings: dict[str, Any]) -> None:
        effort = settings.get("reasoning_effort")
        if effort in REASONING_EFFORTS:
            self.session.reasoning_effort = effort
        if _valid_date(settings.get("current_date")):  # the conversation's own start date
            self.session.current_date = settings["current_date"]
        instructions = settings.get("instructions")
        developer = [m for m in messages if m.role == "developer"]
        if instructions is None and developer:
            instructions = developer[0].content.removeprefix("# Instructions\n\n").split("\n\n# Tools")[0]
        if "instructions" in settings or developer:
            self.session.instructions = instructions if isinstance(instructions, str) else None
        missing = sorted(set(settings.get("tools") or []) - set(self.tools))
        if missing:
            self.say(
                f"note: the conversation used tools not loaded now: {', '.join(missing)}", style="yellow"
            )
        # The cache is kept: the next turn reuses whatever prefix it shares (at least the system message).
        self.session.messages[:] = [m for m in messages if m.role != "developer"]
        self._sync_system()
        self.session.turn_stats.clear()
        self.rows.clear()
        self.turn_no = sum(m.role == "user" for m in messages)
        self.last_analysis = ""

    def show_last_exchange(self) -> None:
        msgs = self.session.messages
        at = self._last_user()
        if at is None:
            return
        self.console.print(Text(f"{PROMPT}{_short(msgs[at].content, 200)}", style="bold"), soft_wrap=True)
        answer = next(
            (m.content for m in msgs[at + 1 :] if m.role == "assistant" and m.channel == "final"), None
        )
        if answer:
            print_markdown(self.console, answer)

    def cmd_tools(self, arg: str) -> None:
        if not self.tools and self.python is None:
            self.say(
                "no tools: start with --tools FILE (a .py module or a .json list of schemas) or --python"
            )
            return
        for tool in self.tools.values():
            how = "runs the function" if tool.function else "you type the result"
            self.console.print(
                Text.assemble(("• ", "dim"), (tool.signature(), "bold cyan"), (f"  {how}", "dim")),
                soft_wrap=True,
            )
            if tool.description:
                self.say(f"    {_short(tool.description, 100)}")
        if self.python is not None:
            self.console.print(
                Text.assemble(
                    ("• ", "dim"), ("python", "bold cyan"), (f"  sandbox: {self.python.limits}", "dim")
                ),
                soft_wrap=True,
            )

    def cmd_stats(self, arg: str) -> None:
        if not self.rows:
            self.say("no replies yet")
            return
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name in (
            "turn",
            "prompt",
            "prefilled",
            "generated",
            "ttft s",
            "tok/s",
            "prefill tok/s",
            "finish",
        ):
            table.add_column(name, justify="left" if name in ("turn", "finish") else "right")
        for label, s in self.rows:
            table.add_row(
                label,
                str(s.prompt_tokens),
                str(s.prefilled_tokens),
                str(s.generated_tokens),
                f"{s.time_to_first_token:.2f}",
                f"{s.generation_tps:.1f}",
                f"{s.prompt_tps:.0f}",
                s.finish_reason,
            )
        self.console.print(table)
        used = self.session.cache.offset
        peak = max((s.peak_memory_gb for _, s in self.rows), default=0.0)
        limit = f" / {self.limit:,}" if self.limit else ""
        self.say(f"context: {used:,}{limit} tokens in the cache · peak memory {peak:.2f} GB")
        from ..streaming import model_streaming_stats

        streamed = model_streaming_stats(self.session.model)
        if streamed is not None:  # --memory-budget
            self.say(f"experts streamed from disk: {streamed.summary()}")

    def cmd_set(self, arg: str) -> None:
        if not arg:
            shown = {k: self.sampling.get(k) for k in cli_args.SAMPLING}
            self.say(" · ".join(f"{k} {'default' if v is None else v}" for k, v in shown.items()))
            return
        name, _, value = arg.partition(" ")
        value = value.strip()
        name = name.replace("-", "_").lower()
        kind = cli_args.SAMPLING.get(name)
        if kind is None or not value:
            self.error(f"/set {'|'.join(cli_args.SAMPLING)} VALUE")
            return
        try:
            number = kind(value)  # the same check as the command-line flag
        except ValueError as e:
            self.error(f"{name} {e}")
            return
        if number is None:
            self.sampling.pop(name, None)
            self.say(f"{name}: random")
            return
        self.sampling[name] = number
        self.say(f"{name}: {number}")

    def cmd_copy(self, arg: str) -> None:
        what = arg.strip().lower()
        if what not in ("", "code"):
            self.error("/copy copies the last reply; /copy code its last code block")
            return
        reply = next(
            (
                m.content
                for m in reversed(self.session.messages)
                if m.role == "assistant" and m.channel == "final" and m.content.strip()
            ),
            None,
        )
        if reply is None:
            self.error("nothing to copy: no reply yet")
            return
        text = reply
        if what == "code":
            splitter = BlockSplitter()
            blocks = splitter.feed(reply) + splitter.flush()
            code = [code_of(b.text)[1] for b in blocks if b.kind == "code" and not b.continued]
            if not code:
                self.error("the last reply has no code block (/copy copies all of it)")
                return
            text = code[-1] + "\n"
        terminal = self.console.file.write if self.console.is_terminal else None
        try:
            done = copy_text(text, data_dir() / "copied.txt", terminal)
        except OSError as e:
            self.error(f"cannot copy: {cli_args.describe_error(e)}")
            return
        lines = text.count("\n") + (not text.endswith("\n"))
        what = f"{'the code block' if what else 'the reply'} ({lines:,} lines, {len(text):,} characters)"
        if done.how == "OSC 52":
            self.say(
                f"copied {what} to the terminal's clipboard (OSC 52: if your terminal does not allow it, "
                f"the text is also in {done.path})"
            )
        elif done.path is not None:
            self.say(f"no clipboard here: {what} written to {done.path}")
        else:
            self.say(f"copied {what} to the clipboard ({done.how})")

    def cmd_json(self, arg: str) -> None:
        if not arg:
            if self.json_schema is None:
                self.say("answers are free text; /json SCHEMA_FILE makes them follow a JSON schema")
            else:
                self.say(f"answers follow the JSON schema in {self.json_file} (/json off: free text)")
            return
        if arg.lower() == "off":
            self.json_schema, self.json_file = None, ""
            self.say("answers are free text again")
            return
        from ..structured import ConstraintError, OutputConstraint, check

        path = Path(arg).expanduser()
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
            check(OutputConstraint(json_schema=schema, tools=self.session.tools, param=str(path)))
        except OSError as e:
            self.error(f"cannot read {path}: {e.strerror or e}")
            return
        except ValueError as e:  # not JSON, or a schema the engine cannot enforce (ConstraintError)
            what = e.message if isinstance(e, ConstraintError) else f"{path} is not JSON: {e}"
            self.error(what)
            return
        self.json_schema, self.json_file = schema, str(path)
        self.say(f"answers follow the JSON schema in {path} (the reasoning stays free; /json off to stop)")

    def cmd_multi(self, arg: str) -> None:
        self.multiline = not self.multiline
        if self.multiline:
            self.say(
                "multi-line input: Enter adds a line, Alt+Enter (Esc Enter) sends; /multi to switch back"
            )
        else:
            self.say("single-line input: Enter sends, Alt+Enter or Ctrl-J adds a line")

    def cmd_exit(self, arg: str) -> bool:
        return False


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ..hub import DEFAULT_MODEL

    A = cli_args
    ap = A.parser(
        "oss-mlx chat", "Chat with gpt-oss in the terminal. /help inside the chat lists the commands."
    )
    ap.add_argument(
        "--model",
        "-m",
        default=os.environ.get("OSS_MLX_MODEL", DEFAULT_MODEL),
        help="hub repo id, checkpoint folder or converted folder "
        f"(default: $OSS_MLX_MODEL, else {DEFAULT_MODEL})",
    )
    ap.add_argument(
        "--reasoning-effort", "-e", choices=REASONING_EFFORTS, default="medium", help="how long it thinks"
    )
    ap.add_argument("--system", "-s", metavar="TEXT", help="instructions (harmony's developer message)")
    ap.add_argument(
        "--reasoning",
        choices=REASONING_MODES,
        default="summary",
        help="chain of thought: summary (one dim line, default), show (in full, dim), hide",
    )
    ap.add_argument(
        "--tools",
        metavar="FILE",
        action="append",
        default=[],
        help="function tools: a .py module of typed functions (called for real) or a .json list of schemas "
        "(you type the results); may be repeated",
    )
    ap.add_argument(
        "--python", action="store_true", help="let the model run Python in a sandboxed subprocess"
    )
    ap.add_argument(
        "--python-timeout",
        type=A.SECONDS,
        default=10.0,
        metavar="S",
        help="seconds per run of the python tool",
    )
    ap.add_argument(
        "--python-memory",
        type=A.Number(int, 32, 2**22),
        default=2048,
        metavar="MB",
        help="address space of the python tool (Linux)",
    )
    ap.add_argument("--max-tokens", type=A.MAX_TOKENS, default=DEFAULT_MAX_TOKENS, help="per reply")
    ap.add_argument(
        "--temperature", type=A.TEMPERATURE, default=1.0, help="0 to 2; 0 is greedy; 1.0 as OpenAI advises"
    )
    ap.add_argument("--top-p", type=A.TOP_P, default=1.0, help="nucleus sampling, above 0 and at most 1")
    ap.add_argument(
        "--seed", type=A.SEED, help="0 to 2^64-1 for every reply; -1 or none: random (the default)"
    )
    ap.add_argument(
        "--history",
        metavar="FILE",
        help="keep this conversation in FILE: resumed if it exists, saved after every turn "
        "(default: a new file in the data folder's chats/)",
    )
    ap.add_argument("--no-autosave", action="store_true", help="do not save the conversation automatically")
    ap.add_argument("--no-markdown", action="store_true", help="print replies as plain text")
    ap.add_argument("--ignore-memory", action="store_true", help="load even if the planner says it won't fit")
    ap.add_argument(
        "--memory-budget",
        type=A.size,
        metavar="SIZE",
        help='e.g. "6GB": keep only hot experts in memory and read the rest from disk (slower, smaller)',
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)

    def fail(message: str, code: int = 1) -> int:
        err.print(f"oss-mlx chat: [red]error:[/] {escape(message)}", soft_wrap=True)
        return code

    tools: list[FunctionTool] = []
    try:
        for file in args.tools:
            tools += load_tools(file)
    except ToolFileError as e:
        return fail(str(e), 2)
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        return fail(f"two tools have the same name: {sorted(n for n in set(names) if names.count(n) > 1)}", 2)

    resumed: tuple[list[Message], dict] | None = None
    autosave = None
    if not args.no_autosave:
        autosave = Path(args.history).expanduser() if args.history else new_autosave_path()
    if args.history and Path(args.history).expanduser().exists():
        try:
            resumed = load_conversation(args.history)
        except ChatFileError as e:
            return fail(f"--history: {e}", 2)

    # The model: a hub id is downloaded and converted on first use (with progress bars).
    start = time.perf_counter()
    try:
        import oss_mlx

        console.print(Text(f"loading {args.model} …", style="dim"))
        # Checked from config.json alone (a hub model's too), before any download or load.
        from ..memory import refuse_unless_fits

        if not (args.memory_budget or args.ignore_memory) and refuse_unless_fits("oss-mlx chat", args.model):
            return 1
        path = prepare_model(args.model, console)
        model, tokenizer = oss_mlx.load(path, memory_budget=args.memory_budget)
    except KeyboardInterrupt:
        return 130
    except (*cli_args.user_errors(), OSError) as e:  # bad folder, offline, no vocabulary: in words
        return fail(f"cannot load {args.model}: {cli_args.describe_error(e)}")
    loaded_in = time.perf_counter() - start

    scripted = os.environ.get("OSS_MLX_SCRIPTED_REPLIES")
    if scripted:
        install_scripted_replies(scripted, tokenizer)
    else:
        # The sampler comes from mlx_lm, whose import takes seconds: done while the user types.
        import threading

        threading.Thread(target=_import_sampler, daemon=True).start()

    from ..session import Session

    session = Session(
        model,
        tokenizer,
        reasoning_effort=args.reasoning_effort,
        instructions=args.system,
        current_date=today(),  # as OpenAI's reference chat: the conversation's start date
    )
    sampling: dict[str, Any] = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
    }
    if args.seed is not None:
        sampling["seed"] = args.seed
    python = PythonSandbox(timeout=args.python_timeout, memory_mb=args.python_memory) if args.python else None
    app = ChatApp(
        session,
        console,
        model_name=Path(str(args.model).rstrip("/")).name or str(args.model),
        reasoning=args.reasoning,
        markdown=not args.no_markdown,
        sampling=sampling,
        tools=tools,
        python=python,
        autosave=autosave,
        context_limit=context_limit(model),
    )
    layout = getattr(getattr(model, "info", None), "layout", "?")
    limit = f" · context limit {app.limit:,}" if app.limit else ""
    console.print(
        Text.assemble(
            ("oss-mlx chat", "bold"),
            (f" · {app.model_name} ({layout}) loaded in {loaded_in:.1f} s{limit}", "dim"),
            (f" · effort {session.reasoning_effort}", "dim"),
        ),
        soft_wrap=True,
    )
    if tools:
        app.say(f"tools: {', '.join(t.name for t in tools)}")
    if python is not None:
        app.say(f"python tool: {python.limits}")
    if resumed is not None:
        app.apply_loaded(*resumed)
        app.say(f"resumed {len(resumed[0])} messages from {args.history}")
        app.show_last_exchange()
    if autosave is not None:
        app.say(f"autosave: {autosave}")
    app.say("/help for commands · Ctrl-C stops a reply · Ctrl-D quits")
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
