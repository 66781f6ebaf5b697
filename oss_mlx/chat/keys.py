"""The chat's input line (prompt_toolkit): key bindings, history, slash-command completion, status bar.
`app` is the ChatApp (not imported: it imports this)."""

from __future__ import annotations

from typing import Any

from . import commands
from .history import data_dir

PROMPT = ">>> "


def toolbar(app: Any) -> str:
    """The status line under the input: model, effort, reasoning view, context used, keys."""
    used = app.session.cache.offset if app.session.cache is not None else 0
    if app.context_used is not None:  # after /undo or /load: what the history holds, not the stale cache
        used = app.context_used
    ctx = f"{used:,}" + (f"/{app.limit:,}" if app.limit else "")
    keys = "multi-line: Enter new line, Alt+Enter send" if app.multiline else "Alt+Enter or Ctrl-J: new line"
    return (  # /help before the keys: a narrow terminal cuts the end of the line
        f" {app.model_name} · effort {app.session.reasoning_effort} · reasoning {app.reasoning}"
        f" · context {ctx} · /help · {keys}"
    )


MENU_ROWS = 8  # prompt_toolkit's default room for the completion menu


def menu_rows(terminal_rows: int) -> int:
    """Rows kept for the input line and its completion menu: prompt_toolkit's 8, less on a short
    terminal, where the bottom line and a row of output must fit too (with 8 kept, a terminal of 8
    rows or fewer showed only "Window too small...")."""
    return max(0, min(MENU_ROWS, terminal_rows - 2))


def prompt_session(app: Any):
    """The input line: Enter sends (completing a slash command first), Alt+Enter or Ctrl-J adds a line
    (the other way round in /multi mode), Ctrl-C clears the line or, on an empty one, asks to quit."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.filters import Condition
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()
    multi = Condition(lambda: app.multiline)

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
        elif app.quit_armed:  # the second Ctrl-C in a row on an empty line
            event.app.exit(exception=EOFError())
        else:
            event.app.exit(exception=KeyboardInterrupt())

    try:
        folder = data_dir()
        folder.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(folder / "input_history"))
    except OSError:
        history = InMemoryHistory()

    class Session(PromptSession):
        # prompt_toolkit reads this at each redraw: it follows the terminal's height, resizes included.
        @property
        def reserve_space_for_menu(self) -> int:
            try:
                return menu_rows(self.app.output.get_size().rows)
            except Exception:  # before the application exists
                return MENU_ROWS

        @reserve_space_for_menu.setter
        def reserve_space_for_menu(self, value: int) -> None:
            pass  # fixed by menu_rows

    session = Session(
        history=history,
        completer=commands.SlashCompleter(),
        complete_while_typing=True,
        key_bindings=kb,
        multiline=True,
        bottom_toolbar=lambda: toolbar(app),
        prompt_continuation=lambda width, line, soft: "." * (width - 1) + " ",
        enable_history_search=False,
    )

    def typed(_buffer) -> None:
        app.quit_armed = False

    session.default_buffer.on_text_changed += typed
    return session
