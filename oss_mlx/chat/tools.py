"""Tools for the chat: function tools from a file, and a sandboxed python tool.

`--tools FILE`
    a Python module: its public functions (or those in `__all__`) become function tools. The
    signature and type hints give the JSON schema, the docstring the descriptions; calls run the
    function for real, in the chat's process (it is your code).
    a JSON file: a list of {name, description, parameters} schemas (OpenAI's {"type": "function",
    "function": {...}} works too). There is no code to run: the chat prints each call and asks you
    to type its result.

`--python`
    gpt-oss's built-in `python` tool (declared in the system message, as OpenAI's reference does).
    The model's code runs in a fresh `python -I` subprocess, in an empty temporary folder, with a
    wall-clock timeout, CPU-time, address-space and file-size limits (setrlimit), and no network:
    in a new network namespace (`unshare -n`, or `unshare -rn` without root) on Linux, under
    `sandbox-exec` with network denied on macOS. Where neither works, socket creation is disabled
    inside the interpreter, which code can get around: `PythonSandbox.network` says which applies.
    Files outside the temporary folder are NOT protected: the code runs as you.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------
# JSON schema of a Python function
# ---------------------------------------------------------------------------------------------------


class ToolFileError(ValueError):
    """A tools file that cannot be used (the message says why)."""


_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?|See Also)\s*:?\s*$",
    re.IGNORECASE,
)
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")
_GOOGLE_PARAM = re.compile(r"^\s*\*{0,2}(\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")
_NUMPY_PARAM = re.compile(r"^\s*(\w+)\s*(?::\s*(.*))?$")
_REST_PARAM = re.compile(r"^\s*:param\s+(?:[\w\[\], .|]+\s+)?(\w+)\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google, NumPy or reST style docstring."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None  # None (the description), "params", "rest", "other"
    current: str | None = None
    numpy = False
    entry_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        indent = len(line) - len(line.lstrip())
        rest = _REST_PARAM.match(line)
        if rest:
            section, current = "rest", rest.group(1)
            params[current] = rest.group(2).strip()
            continue
        if line.lstrip().startswith(":") and section in (None, "rest"):  # :returns:, :raises: ...
            section, current = "rest", None
            continue
        header = _SECTION.match(line)
        if header:
            name = header.group(1).lower()
            section = "params" if name in ("args", "arguments", "parameters", "params") else "other"
            current, entry_indent = None, None
            numpy = i < len(lines) and bool(_UNDERLINE.match(lines[i]))
            if numpy:
                i += 1
            continue
        if section is None:
            summary.append(line)
        elif section == "params" and line.strip():
            if entry_indent is None:
                entry_indent = indent
            if indent <= entry_indent:
                match = (_NUMPY_PARAM if numpy else _GOOGLE_PARAM).match(line)
                current = match.group(1) if match else None
                if current:
                    params[current] = "" if numpy else (match.group(3) or "").strip()
            elif current:
                params[current] = (params[current] + " " + line.strip()).strip()
        elif section == "rest" and current and line.strip() and indent > 0:
            params[current] = (params[current] + " " + line.strip()).strip()
    # Paragraphs kept; the lines of a paragraph joined.
    text = "\n".join(summary).strip()
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n\n".join(paragraphs), params


def _is_none(tp: Any) -> bool:
    return tp is None or tp is type(None)


def type_schema(tp: Any) -> dict[str, Any]:
    """JSON schema of a type hint (str, int, float, bool, list[X], dict, Literal, Enum, X | None,
    Union, TypedDict, dataclass). Unknown types give {} (any)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        schema = type_schema(args[0])
        extra = next((a for a in args[1:] if isinstance(a, str)), None)
        if extra:
            schema["description"] = extra
        return schema
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if not _is_none(a)]
        nullable = len(members) < len(args)
        if len(members) == 1:
            schema = type_schema(members[0])
        else:
            schema = {"oneOf": [type_schema(a) for a in members]}
        if nullable:
            schema["nullable"] = True
        return schema
    if origin is typing.Literal:
        values = list(args)
        kinds = {type(v) for v in values}
        schema = {"enum": values}
        if kinds == {str}:
            schema["type"] = "string"
        elif kinds <= {int, bool} and bool not in kinds:
            schema["type"] = "integer"
        elif kinds <= {int, float}:
            schema["type"] = "number"
        return schema
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if _is_none(tp):
        return {"type": "null"}
    if inspect.isclass(tp) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        schema = {"enum": values}
        if all(isinstance(v, str) for v in values):
            schema["type"] = "string"
        elif all(isinstance(v, int) for v in values):
            schema["type"] = "integer"
        return schema
    if inspect.isclass(tp) and typing.is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        required = sorted(getattr(tp, "__required_keys__", hints))
        return {
            "type": "object",
            "properties": {k: type_schema(v) for k, v in hints.items()},
            "required": required,
        }
    if dataclasses.is_dataclass(tp) and inspect.isclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        props, required = {}, []
        for f in dataclasses.fields(tp):
            props[f.name] = type_schema(hints.get(f.name, Any))
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        return {"type": "object", "properties": props, "required": required}
    container = origin or tp
    if container in (list, tuple, set, frozenset) or (
        inspect.isclass(container) and issubclass(container, Sequence) and container is not str
    ):
        item = args[0] if args and args[0] is not Ellipsis else None
        return {"type": "array", "items": type_schema(item)} if item is not None else {"type": "array"}
    if container in (dict, Mapping) or (inspect.isclass(container) and issubclass(container, Mapping)):
        return {"type": "object"}
    return {}


def _json_default(value: Any) -> tuple[bool, Any]:
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False, None
    return True, value


def function_schema(fn: Callable, name: str | None = None) -> dict[str, Any]:
    """{name, description, parameters} of a function, from its signature, type hints and docstring.

    Parameters without a default are required; defaults that JSON can hold are given as `default`;
    an un-annotated parameter takes the type of its default. *args / **kwargs are left out.
    """
    description, param_docs = parse_docstring(inspect.getdoc(fn))
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        hints = dict(getattr(fn, "__annotations__", {}))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("self", "cls"):
            continue
        hint = hints.get(p.name, inspect.Parameter.empty)
        if hint is inspect.Parameter.empty and p.default is not p.empty and p.default is not None:
            hint = type(p.default)
        schema = type_schema(hint)
        if p.name in param_docs and param_docs[p.name] and "description" not in schema:
            schema["description"] = param_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        else:
            ok, value = _json_default(p.default)
            if ok and value is not None:
                schema["default"] = value
        properties[p.name] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {"name": name or fn.__name__, "description": description, "parameters": parameters}


# ---------------------------------------------------------------------------------------------------
# Function tools
# ---------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass
class FunctionTool:
    """A function tool: its schema, and the function to call (None: the user types the result)."""

    name: str
    description: str
    parameters: dict | None
    function: Callable | None = None
    source: str = ""

    @property
    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def signature(self) -> str:
        props = (self.parameters or {}).get("properties") or {}
        required = set((self.parameters or {}).get("required") or [])
        parts = []
        for key, prop in props.items():
            typ = prop.get("type", "any") if isinstance(prop, dict) else "any"
            if isinstance(prop, dict) and "enum" in prop:
                typ = "|".join(json.dumps(v) for v in prop["enum"])
            parts.append(f"{key}{'' if key in required else '?'}: {typ}")
        return f"{self.name}({', '.join(parts)})"

    def call(self, arguments: str) -> tuple[bool, str]:
        """Run the function with the model's JSON arguments: (ok, text for the model)."""
        if self.function is None:
            raise RuntimeError(f"{self.name} has no implementation")
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return False, f"error: the arguments are not valid JSON ({e.msg} at {e.pos})"
        if not isinstance(args, dict):
            return False, "error: the arguments must be a JSON object"
        try:
            result = self.function(**args)
        except TypeError as e:
            return False, f"error: {e}"
        except Exception as e:  # the tool's own failure is the model's business
            return False, f"error: {type(e).__name__}: {e}"
        return True, result_text(result)


def result_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ToolFileError(f"{where}: tool name {name!r} must be letters, digits, '_' or '-'")
    return name


def tools_from_module(path: Path) -> list[FunctionTool]:
    """Public functions defined in a Python file (or listed in its __all__)."""
    name = f"oss_mlx_user_tools_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ToolFileError(f"{path}: cannot import it as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ToolFileError(f"{path}: importing it failed: {type(e).__name__}: {e}") from None
    exported = getattr(module, "__all__", None)
    if exported is not None:
        functions = [getattr(module, n, None) for n in exported]
        functions = [f for f in functions if callable(f)]
    else:
        functions = [
            obj
            for key, obj in vars(module).items()
            if not key.startswith("_") and inspect.isfunction(obj) and obj.__module__ == name
        ]
    tools = []
    for fn in functions:
        schema = function_schema(fn)
        tools.append(
            FunctionTool(
                _check_name(schema["name"], str(path)),
                schema["description"],
                schema["parameters"],
                fn,
                source=str(path),
            )
        )
    if not tools:
        raise ToolFileError(f"{path}: no public functions found")
    return tools


def tools_from_json(path: Path) -> list[FunctionTool]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ToolFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict):
        data = data.get("tools", [data])
    if not isinstance(data, list):
        raise ToolFileError(f"{path}: expected a list of tool schemas")
    tools = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ToolFileError(f"{path}: tool #{i + 1} is not an object")
        spec = item.get("function", item) if item.get("type", "function") == "function" else None
        if not isinstance(spec, dict) or "name" not in spec:
            raise ToolFileError(f"{path}: tool #{i + 1} has no name")
        params = spec.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolFileError(f"{path}: parameters of {spec['name']!r} must be a JSON schema object")
        tools.append(
            FunctionTool(
                _check_name(spec["name"], str(path)),
                str(spec.get("description") or ""),
                params,
                None,
                source=str(path),
            )
        )
    return tools


def load_tools(path: str | os.PathLike) -> list[FunctionTool]:
    """Function tools from a .py module or a .json list of schemas."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ToolFileError(f"{p}: no such file")
    if p.suffix == ".py":
        return tools_from_module(p)
    if p.suffix == ".json":
        return tools_from_json(p)
    raise ToolFileError(f"{p}: expected a Python module (.py) or a JSON list of schemas (.json)")


# ---------------------------------------------------------------------------------------------------
# The python tool
# ---------------------------------------------------------------------------------------------------

PYTHON_TOOL_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the "
    "user. This tool should be used for internal reasoning, but not for code that is intended to be "
    "visible to the user (e.g. when creating plots, tables, or files).\n\n"
    "When you send a message containing Python code to python, it will be executed in a stateless "
    "sandboxed process, and the stdout of that process will be returned to you. You have to use print "
    "statements to access the output; the value of a last bare expression is printed too. "
    "The process times out after {timeout:g} seconds. Internet access for this session is disabled."
)

# Runs inside the sandbox: reads the code on stdin, optionally disables sockets, runs it, and prints
# the value of a last bare expression (as a notebook would).
_RUNNER = r"""
import ast, sys, traceback
code = sys.stdin.read()
if {block_sockets}:
    import socket
    def _blocked(*a, **k):
        raise OSError("network access is disabled in this sandbox")
    socket.socket = _blocked
    socket.create_connection = _blocked
    socket.getaddrinfo = _blocked
    socket.socketpair = _blocked
scope = {{"__name__": "__main__", "__builtins__": __builtins__}}
try:
    tree = ast.parse(code, "<python>", "exec")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<python>", "exec"), scope)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<python>", "eval"), scope)
        if value is not None:
            print(repr(value))
except BaseException as e:  # the user's frames only, not this runner's
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<python>":
        tb = tb.tb_next
    sys.stdout.flush()
    traceback.print_exception(type(e), e, tb)
    sys.exit(1)
"""


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_SANDBOX_PROFILE = "(version 1)(allow default)(deny network*)"


def detect_network_isolation() -> tuple[list[str], str]:
    """(command prefix, description) of the strongest network isolation that works here."""
    if sys.platform.startswith("linux") and shutil.which("unshare"):
        for flags in (["-n"], ["-rn"]):
            if _works(["unshare", *flags, "true"]):
                return ["unshare", *flags], f"enforced: new network namespace (unshare {' '.join(flags)})"
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        cmd = ["sandbox-exec", "-p", _SANDBOX_PROFILE]
        if _works([*cmd, "/usr/bin/true"]):
            return cmd, "enforced: sandbox-exec profile denying network"
    return [], "best effort: sockets disabled inside Python (code could get around it)"


@dataclass
class PythonResult:
    output: str
    ok: bool
    timed_out: bool = False
    returncode: int | None = None


@dataclass
class PythonSandbox:
    """Runs code in a fresh subprocess with limits (see the module docstring)."""

    timeout: float = 10.0
    memory_mb: int = 2048
    max_output: int = 16000
    python: str = sys.executable
    prefix: list[str] = field(default_factory=list)
    network: str = ""

    def __post_init__(self) -> None:
        if not self.network:
            self.prefix, self.network = detect_network_isolation()

    @property
    def limits(self) -> str:
        mem = f"{self.memory_mb} MB address space" if sys.platform.startswith("linux") else "no memory limit"
        return f"{self.timeout:g} s, {mem}, network {self.network}"

    def _preexec(self) -> None:  # runs in the child, before exec
        import resource

        os.setsid()
        cpu = max(1, int(self.timeout) + 1)
        limits = [
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_FSIZE, 64 << 20),
            (resource.RLIMIT_CORE, 0),
        ]
        if self.memory_mb:
            limits.append((resource.RLIMIT_AS, self.memory_mb << 20))
        for what, value in limits:
            try:
                resource.setrlimit(what, (value, value))
            except (ValueError, OSError):
                pass  # e.g. RLIMIT_AS on macOS

    def run(self, code: str) -> PythonResult:
        runner = _RUNNER.format(block_sockets=not self.prefix)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MPLBACKEND": "Agg",
        }
        with tempfile.TemporaryDirectory(prefix="oss-mlx-python-") as work:
            env["HOME"] = env["TMPDIR"] = work
            cmd = [*self.prefix, self.python, "-I", "-c", runner]
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                    env=env,
                    preexec_fn=self._preexec,
                )
            except OSError as e:
                return PythonResult(f"error: cannot start python: {e}", ok=False)
            try:
                out, _ = proc.communicate(code.encode("utf-8", "replace"), timeout=self.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                self._kill(proc)
                out, _ = proc.communicate()
                timed_out = True
            except BaseException:  # Ctrl-C: do not leave it running
                self._kill(proc)
                proc.communicate()
                raise
        text = out.decode("utf-8", "replace")
        if len(text) > self.max_output:
            cut = len(text) - self.max_output
            text = text[: self.max_output] + f"\n… (output cut: {cut} more characters)"
        if timed_out:
            text += f"\nerror: timed out after {self.timeout:g} seconds"
        elif proc.returncode and proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else ""
            text += f"\nerror: killed by signal {sig or -proc.returncode}"
            if sig == "SIGXCPU":
                text += " (CPU time limit)"
        return PythonResult(text, ok=proc.returncode == 0, timed_out=timed_out, returncode=proc.returncode)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()


def python_system_section(timeout: float) -> str:
    """The `# Tools` section the system message gets with --python (openai-harmony's layout)."""
    return "# Tools\n\n## python\n\n" + PYTHON_TOOL_DESCRIPTION.format(timeout=timeout)
