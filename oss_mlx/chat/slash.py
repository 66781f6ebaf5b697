"""The slash commands' actions (`/effort`, `/save`, `/copy` ...): ChatApp's `cmd_<name>` methods, kept
here as a mixin of it; commands.py holds their table, parsing, help and completion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from .. import cli_args
from ..harmony import REASONING_EFFORTS, Message
from ..interrupts import InterruptGuard
from . import commands, keys
from .clipboard import copy_text
from .history import ChatFileError, data_dir, load_conversation, new_autosave_path, read_small_file
from .render import REASONING_MODES, BlockSplitter, code_of, plural, print_markdown


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


def _unquote(arg: str) -> str:
    """A file name as typed: `"with space.json"` and `'x.json'` lose their quotes (as in a shell)."""
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
        return arg[1:-1]
    return arg


def _key(path: Path) -> Path:
    """One spelling per file, to recognise a file this conversation wrote."""
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


class SlashCommands:
    """ChatApp's slash commands (a mixin: the attributes they use are ChatApp's)."""

    def cmd_help(self, arg: str) -> None:
        if arg:  # /help NAME: that command only
            command = commands.find(arg.removeprefix("/").lower())
            if command is None:
                self.error(f"no command /{arg.removeprefix('/')}: /help alone lists them all")
                return
            self.console.print(
                Text.assemble((command.usage, "bold cyan"), ("  " + command.help, "")), soft_wrap=True
            )
            return
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

    def _leave_conversation(self) -> str:
        """Before the conversation is replaced (/clear, /load): it is saved where it is, and the autosave
        moves on to a new file, so that the old one stays. Returns a note saying where it stays."""
        self.own_files = set()
        if self.autosave_path is None:
            return ""
        self.autosave()
        old = self.autosave_path
        if not old.is_file():  # nothing was saved there: the new conversation may have the name
            return ""
        folder = old.parent.parent if old.parent.name == "chats" else data_dir()
        self.autosave_path = new_autosave_path(folder)
        self._autosave_warned = False
        return f"the previous conversation stays saved in {old}"

    def cmd_clear(self, arg: str) -> None:
        note = self._leave_conversation()
        self.session.reset()
        self.session.current_date = today()
        self.rows.clear()
        self.turn_no = 0
        self.last_analysis = ""
        self.context_used = None
        self.say("new conversation" + (f" ({note})" if note else ""))

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
        self.context_used = self.history_tokens()  # the bottom line shows what is left, not the cache
        self.say(f"removed: {_short(text)}")

    def cmd_save(self, arg: str, force: bool = False) -> None:
        if not arg:
            self.error("/save FILE (/save! FILE replaces an existing file)")
            return
        path = Path(_unquote(arg)).expanduser()
        if path.is_dir():
            self.error(f"cannot save to {path}: it is a folder; give a file name")
            return
        if not path.parent.is_dir():
            self.error(
                f"cannot save to {path}: the folder {path.parent} does not exist (create it, or choose "
                "another place)"
            )
            return
        if path.exists() and not path.is_file():
            self.error(f"cannot save to {path}: it is not a regular file; choose another name")
            return
        own = self.own_files | ({_key(self.autosave_path)} if self.autosave_path else set())
        if path.exists() and not force and _key(path) not in own:
            # Another conversation's save, or any file of the user's: not replaced unless asked.
            self.error(f"{path} already exists: choose another name, or /save! {arg} to replace it")
            return
        guard = InterruptGuard()  # a Ctrl-C now waits: the file is written whole
        try:
            with guard, guard.hold():
                self.save(path, make_parents=False)
        except OSError as e:
            self.error(f"cannot save to {path}: {e.strerror or e}")
            return
        self.own_files.add(_key(path))
        n = sum(m.role != "system" for m in self.session.messages)
        self.say(f"saved {plural(n, 'message')} to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.error("/load FILE")
            return
        path = Path(_unquote(arg)).expanduser()
        try:
            messages, settings = load_conversation(path)
        except ChatFileError as e:
            self.error(f"cannot load: {e}")
            return
        note = self._leave_conversation()
        self.apply_loaded(messages, settings)
        self.own_files = {_key(path)}  # /save FILE may write it back
        users = sum(m.role == "user" for m in messages)
        self.say(f"loaded {plural(len(messages), 'message')} ({plural(users, 'turn')}) from {path}")
        if note:
            where = f"; this one is autosaved in {self.autosave_path}" if self.autosave_path else ""
            self.say(note + where)
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
        self.context_used = self.history_tokens()

    def show_last_exchange(self) -> None:
        msgs = self.session.messages
        at = self._last_user()
        if at is None:
            return
        self.console.print(
            Text(f"{keys.PROMPT}{_short(msgs[at].content, 200)}", style="bold"), soft_wrap=True
        )
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
        if kind is None:
            self.error(f"unknown setting {name!r}: /set takes {', '.join(cli_args.SAMPLING)}")
            return
        if not value:
            self.error(f"/set {name} VALUE")
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
        size = f"{plural(lines, 'line')}, {plural(len(text), 'character')}"
        what = f"{'the code block' if what else 'the reply'} ({size})"
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

        path = Path(_unquote(arg)).expanduser()
        try:
            schema = json.loads(read_small_file(path, "JSON schema"))
            constraint = OutputConstraint(json_schema=schema, tools=self.session.tools, param=str(path))
            check(constraint, self.session.tokenizer)
        except ChatFileError as e:  # missing, a folder, a device, too big (before the ValueError below)
            self.error(f"cannot read {e}")
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
