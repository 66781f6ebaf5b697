"""The chat application, `ChatApp`: the read-reply loop, a turn and its tool calls, a streamed reply,
autosave. Its slash commands are in slash.py, its input line in keys.py; `oss-mlx chat`'s arguments
and start-up in main.py (docs/CHAT.md is the user's guide)."""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from .. import cli_args
from ..distributed.errors import DistributedError
from ..harmony import Message, TextDelta, Tool, ToolCall, render_developer, render_system
from ..interrupts import InterruptGuard
from . import commands, keys
from .guard import LoopDetector, is_interactive, no_echo
from .history import save_conversation
from .render import ReplyView, plural
from .slash import SlashCommands
from .tools import FunctionTool, PythonSandbox, python_system_section

MAX_TOOL_ROUNDS = 12


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
            plural(stats.generated_tokens, "token"),
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


# ---------------------------------------------------------------------------------------------------
# The chat
# ---------------------------------------------------------------------------------------------------


class ChatApp(SlashCommands):
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
        script: Any = None,
    ) -> None:
        self.session = session
        self.console = console
        self.model_name = model_name
        self.reasoning = reasoning
        self.markdown = markdown
        self.sampling: dict[str, Any] = dict(sampling or {})
        self.tools = {t.name: t for t in tools or []}
        self.python = python
        self.script = script  # the test hook (oss_mlx/testing/scripted.py), None in normal use
        self.autosave_path = autosave
        self.limit = context_limit
        self.multiline = False
        self.turn_no = sum(m.role == "user" for m in session.messages)
        self.rows: list[tuple[str, Any]] = []  # (turn label, GenerationStats) per reply
        self.last_analysis = ""
        self._autosave_warned = False
        self._prompt = None
        self.quit_armed = False  # Ctrl-C on an empty line was pressed: a second one quits
        self.session.tools = [Tool(t.name, t.description, t.parameters) for t in self.tools.values()]
        self.json_schema: dict | None = None  # /json: the answers follow this schema (enforced)
        self.json_file = ""
        self.own_files: set[Path] = set()  # this conversation's files: /save may replace them
        self.context_used: int | None = None  # the history's tokens, when the cache is stale (/undo)
        self._capped = False  # this reply's max_tokens was lowered to the room left in the context

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

    def save(self, path: Path, pending: list[Message] | None = None, *, make_parents: bool = True) -> None:
        self._sync_system()
        save_conversation(
            path,
            self.session.messages + list(pending or []),
            self.settings(),
            make_parents=make_parents,
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

    def read(self) -> str:
        """The next input; EOFError at the end (Ctrl-D, Ctrl-C on an empty line, end of stdin)."""
        if not is_interactive():
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
        if self._prompt is None:
            self._prompt = keys.prompt_session(self)
        return self._prompt.prompt(keys.PROMPT)

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
        # No echo outside the input line too (prompt_toolkit puts back what it found): keys typed after
        # Enter, before the reply starts, would otherwise be echoed into it, and an Enter typed then
        # would reach the next prompt as a new line (Ctrl-J) instead of sending. Not for a line read
        # from stdin (a tty, but the output is not: see `read`): Enter must end its line there.
        with no_echo() if is_interactive() else contextlib.nullcontext():
            return self._loop()

    def _loop(self) -> int:
        while True:
            try:
                line = self.read()
            except EOFError:
                return self.quit()
            except KeyboardInterrupt:
                # Ctrl-C on an empty line (or one meant for a reply that had already stopped): the
                # chat ends only when it is pressed again, and says so.
                self.quit_armed = True
                self.say("(Ctrl-C again quits; so do Ctrl-D and /exit)")
                continue
            self.quit_armed = False
            if not line.strip():
                continue
            keep = True
            try:
                keep = self.handle(line)
            except KeyboardInterrupt:
                self.say("interrupted")
            except DistributedError as e:  # a rank or a link is gone: the model is too
                self.error(str(e))
                self.autosave()
                return 1
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
            word = line.strip()
            if commands.looks_like_command(word):  # "/", "/!", "/?": surely not meant for the model
                self.error(f"{word} is not a command: /help lists the commands (// sends a leading slash)")
                return True
            self.turn(commands.unescape(line))
            return True
        name, arg = parsed
        force = name.endswith("!")
        name = name.rstrip("!")
        command = commands.find(name)
        if command is None:
            options = commands.candidates(name)
            if options:
                listed = " or ".join(f"/{o}" for o in options)
                self.error(f"/{name} could be {listed}: type more of the name")
            else:
                self.error(f"unknown command /{name} — /help lists the commands (// sends a leading slash)")
            return True
        if force and command.name != "save":
            self.error(f"/{command.name} has no ! form (only /save! FILE, which replaces an existing file)")
            return True
        if arg and " " not in command.usage:  # a command without arguments: the words are a mistake
            self.error(f"/{command.name} takes no argument (got {arg!r}): type /{command.name} alone")
            return True
        action = getattr(self, f"cmd_{command.name}")
        return (action(arg, force=True) if force else action(arg)) is not False

    # -- a turn -----------------------------------------------------------------------------------------

    def turn(self, text: str | None, label: str | None = None) -> None:
        """A user message (or None: reply again to the history), with tool calls until the answer."""
        if text is not None:
            if not self._fits(text):
                return
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

    def history_tokens(self, extra: list[Message] | None = None) -> int:
        """The prompt's length in tokens: the history (and `extra` messages) as the model would read it."""
        self._sync_system()
        messages = self.session.messages + list(extra or [])
        return len(self.session.render(messages)) if any(m.role != "system" for m in messages) else 0

    def _fits(self, text: str) -> bool:
        """A message the context cannot hold is refused before anything is processed."""
        if not self.limit:
            return True
        total = self.history_tokens([Message("user", text)])
        if total < self.limit:  # room for at least one token of reply
            return True
        held = len(self.session.render())  # the system message and the conversation so far
        self.error(
            f"message too long: about {plural(total - held, 'token')}, with {held:,} already in the context "
            f"(system message and conversation): the prompt would be {total:,} tokens, over the context "
            f"limit of {self.limit:,}. "
            "Send a shorter message, or make room with /undo or /clear (Up brings the message back)"
        )
        return False

    def _room(self, prompt: str | None) -> int | None:
        """Tokens the context has left for this reply (None: no limit known)."""
        if not self.limit:
            return None
        extra = [Message("user", prompt)] if prompt is not None else []
        return self.limit - self.history_tokens(extra)

    def reply(self, prompt: str | None, label: str) -> tuple[Any, str | None]:
        """Stream one reply. Returns (Reply or None, why it was stopped: None, "interrupted", "loop",
        "full": the context has no room left for it)."""
        from ..generation import SamplingOptions
        from ..session import Done

        self._sync_system()
        sampling = dict(self.sampling)
        room = self._room(prompt)
        if room is not None and room < 1:
            self.error(
                f"the context is full ({self.limit - room:,}/{self.limit:,} tokens): no room for a reply. "
                "/undo or /clear make room"
            )
            return None, "full"
        wanted = sampling.get("max_tokens") or SamplingOptions().max_tokens
        self._capped = room is not None and room < wanted
        if self._capped:  # a reply must not run past the context limit
            sampling["max_tokens"] = room
        view = ReplyView(self.console, self.reasoning, self.markdown)
        detector = LoopDetector()
        before = len(self.session.turn_stats)
        stopped = None
        reply = None
        guard = InterruptGuard()
        with guard:
            with no_echo():
                constraint = {"json_schema": self.json_schema} if self.json_schema is not None else {}
                sampling = self._sampling_for(prompt, sampling)
                events = self.session.send(prompt, on_prefill=view.prefill, **sampling, **constraint)
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

    def _sampling_for(self, prompt: str | None, sampling: dict[str, Any]) -> dict[str, Any]:
        """The reply's sampling (the /set values), as scripted options when the test hook is on."""
        if self.script is None:
            return sampling
        from ..generation import SamplingOptions

        last = [prompt] if prompt is not None else self.session.messages
        return {"options": self.script.options(SamplingOptions(**sampling), last)}

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
            self.context_used = None  # the cache holds the conversation again
            if stopped and stats.finish_reason == "length":
                stats.finish_reason = "interrupted"
            self.rows.append((label, stats))
            self.say(format_stats(stats, self.limit))
            if self._capped and stats.finish_reason == "length":
                self.say(
                    f"the reply stopped at the context limit ({self.limit:,} tokens): /undo or /clear "
                    "make room",
                    style="yellow",
                )
            elif self.limit and stats.context_tokens > 0.9 * self.limit:
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
