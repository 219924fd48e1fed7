"""
nanoGPT's poor man's configurator, as a function, with its sharp edges filed off.

A script declares its settings as annotated module-level globals, each with a one-line comment that --help shows:

    temperature: float = 0.8  # 1.0 = unchanged, < 1.0 = less random, > 1.0 = more random
    top_k: Optional[int] = 200  # keep only the k most likely tokens; None keeps all

and then, before using them, calls

    from configurator import configure
    configure(globals(), sys.argv[1:])

which applies the command line to those globals in order, as nanoGPT's configurator does:
- an argument without '=' (and not starting with '-') names a config file, run as Python over the settings;
- --key=value sets a setting: the value is read with ast.literal_eval, and taken as a plain string if that fails
  (or if the setting is a string, so --start=42 is the prompt "42"). Only the first '=' splits, so values may
  hold '='. --flag alone sets a bool to True.
The annotation is the contract: an int is accepted for a float, None only for Optional settings, and a bool takes
True/False/true/false/1/0. An unknown key, a wrong type or a broken config file prints a one-line message naming
the problem and exits with status 2 (no traceback); --help (or -h) lists every setting and exits with status 0.
Settings are found by reading the calling script's source, so its annotations are never evaluated at run time.

run_main(main) then runs the script and turns what ends it into one line and an exit status: a UsageError 2,
Ctrl-C 130, SIGTERM 143 (both raised in the main thread, so a script can catch them and keep its work first), a
reader leaving the pipe 141, a full disk 1.
"""

import ast
import difflib
import io
import math
import os
import signal
import sys
import threading
import time
import tokenize
from ast import literal_eval
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


@dataclass
class Setting:
    name: str
    kind: type  # int, float, bool or str
    optional: bool  # None is allowed
    comment: str


class UsageError(Exception):
    """A user's mistake (a setting, a file, the model asked for); the message says which and how to fix it.

    Every script prints it the same way, through run_main: one paragraph on stderr, no traceback, exit status 2.
    """


def configure(config: dict, argv: Sequence[str]) -> None:
    """Apply argv (config files and --key=value overrides) to the settings in config, the caller's globals().

    On a mistake it prints 'error: ...' to stderr and exits with status 2; on --help it prints the settings and
    exits with status 0.
    """
    prog = Path(config.get("__file__", "script")).name
    settings = read_settings(config["__file__"])
    try:
        for arg in argv:
            if arg in ("-h", "--help"):
                print(help_text(prog, settings, config, config.get("__doc__")))
                sys.exit(0)
            apply_argument(arg, config, settings)
    except UsageError as e:
        exit_with_usage_error(prog, e)


def exit_with_usage_error(prog: str, error: Exception) -> NoReturn:
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


class Terminated(BaseException):
    """SIGTERM (`kill`, `timeout`), raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that both take
    one orderly path: the script keeps what it made, then run_main exits with 143 (130 for Ctrl-C), the statuses a
    shell reports for those signals. A BaseException, as KeyboardInterrupt is, so that no `except Exception` eats it."""


class OutputError(Exception):
    """stdout does not take what is written to it (a full disk, say): run_main reports it and exits with status 1,
    as `cat` does."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_STOP_SECONDS = 1.0  # a stop signal this soon after another is part of the same stop
# signals_held's nesting, the stop it keeps back until its end, and when the last stop signal came
_stops = {"depth": 0, "pending": None, "last": -math.inf}


def _on_stop_signal(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: stop the work where it is. One that follows within a second belongs to the same stop (Ctrl-C
    pressed twice, `kill` after Ctrl-C) and is ignored, so that it cannot cut short the writing of what was made; a
    later one stops again (the first may have been lost: torch swallows one that lands while it imports numpy)."""
    now = time.monotonic()
    if now - _stops["last"] < SAME_STOP_SECONDS:
        return
    _stops["last"] = now
    stop = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
    if _stops["depth"]:
        _stops["pending"] = _stops["pending"] or stop
        return
    raise stop


@contextmanager
def signals_held() -> Iterator[None]:
    """A stop signal that arrives inside the block is raised at its end: text written inside is never cut in half
    or, with its bookkeeping cut short, written twice."""
    _stops["depth"] += 1
    try:
        yield
    finally:
        _stops["depth"] -= 1
        if not _stops["depth"] and _stops["pending"] is not None:
            stop, _stops["pending"] = _stops["pending"], None
            raise stop


def quiet_startup() -> None:
    """Ctrl-C while a script's imports load (torch takes seconds), before run_main runs, ends the process as run_main
    would: a line on stderr and status 130, no traceback. Called first thing by each script run as a program."""
    sys.excepthook = _startup_excepthook


def _startup_excepthook(kind: type, value: BaseException, tb: Any) -> None:
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # at once: Python would otherwise end itself by SIGINT, a different status to a parent process


def run_main(main: Callable[[], Optional[int]]) -> NoReturn:
    """Run a script's main and exit with its status: a UsageError (LoadError and TokenizerError are ones) as a
    message and status 2, Ctrl-C as 130 and SIGTERM as 143 (main may catch KeyboardInterrupt and Terminated to keep
    its work first), a reader that left the pipe (`| head`) quietly as 141, and output that cannot be written (a full
    disk) as a message and status 1."""
    prog = Path(sys.argv[0]).name
    if sys.stderr is None:  # started with stderr closed (2>&-): print(file=None) would write to stdout instead
        sys.stderr = open(os.devnull, "w")
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    _stops.update(depth=0, pending=None, last=-math.inf)
    previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS} if in_main_thread else {}
    try:
        status = main()
        if sys.stdout is not None:
            flush_stdout()  # here, not at exit, where a failure could only be printed as a traceback
    except UsageError as e:
        exit_with_usage_error(prog, e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        sys.exit(143)
    except BrokenPipeError:
        discard_stdout()
        sys.exit(141)  # what a shell reports for a process ended by SIGPIPE
    except OutputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        discard_stdout()
        sys.exit(1)
    finally:
        # Restored for a caller that goes on (a test running the script in process), unless a stop signal came:
        # then later ones are ignored to the very end (while Python shuts down it restores the default handlers,
        # with which one would end the process with another status).
        stopped = _stops["last"] > -math.inf
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if stopped else handler)
    sys.exit(status or 0)


@contextmanager
def writing_stdout(what: str = "") -> Iterator[None]:
    """An OSError in the block (a full disk, say) becomes an OutputError naming what was being written; a closed
    pipe (BrokenPipeError) passes on, for run_main to end quietly."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {what}to stdout: {e.strerror or e}") from None


def flush_stdout() -> None:
    with writing_stdout():
        sys.stdout.flush()


def discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what could not be written does not fail
    again as a traceback."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no stdout, or not a file (a test's capture)
        return
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


def apply_argument(arg: str, config: dict, settings: dict[str, Setting]) -> None:
    if not arg.startswith("-"):
        if "=" in arg:
            raise UsageError(f"'{arg}' looks like a setting: write it as --{arg}")
        apply_config_file(arg, config, settings)
        return
    key, has_value, text = arg.lstrip("-").partition("=")
    setting = lookup(key, settings)
    if not has_value:
        if setting.kind is not bool:
            raise UsageError(f"--{key} needs a value: --{key}=VALUE ({describe(setting)})")
        config[key] = True
        return
    config[key] = convert(setting, parse_value(setting, text), text)


def parse_value(setting: Setting, text: str) -> Any:
    """The command line's text as a Python value: a literal if it is one, else the text itself."""
    try:
        value = literal_eval(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return text
    # A string setting takes the text as typed unless it was written as a quoted literal ('\n') or None.
    if setting.kind is str and not isinstance(value, str) and not (value is None and setting.optional):
        return text
    return value


def convert(setting: Setting, value: Any, shown: Any = None) -> Any:
    """value checked (and widened, int to float) against the setting's type; UsageError when it does not fit."""
    if value is None and setting.optional:
        return None
    if setting.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in BOOL_WORDS:
            return BOOL_WORDS[str(value).lower()]
    elif setting.kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # 1e999 reads as inf; a config file can say float('nan')
                raise UsageError(f"{setting.name} expects a finite number, got {value!r}")
            return float(value)
    elif setting.kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, setting.kind):
        return value
    shown = value if shown is None else shown
    raise UsageError(f"{setting.name} expects {describe(setting)}, got {shown!r}")


def describe(setting: Setting) -> str:
    kind = {bool: "a bool (True/False/true/false/1/0)", int: "an int", float: "a float", str: "a string"}
    return kind[setting.kind] + (" or None" if setting.optional else "")


def lookup(key: str, settings: dict[str, Setting]) -> Setting:
    if key in settings:
        return settings[key]
    close = difflib.get_close_matches(key, settings, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else \
        f"the settings are {', '.join(settings)}"
    raise UsageError(f"unknown setting '{key}': {hint} (--help lists them)")


def apply_config_file(path: str, config: dict, settings: dict[str, Setting]) -> None:
    """Run the file as Python over a copy of the settings, then check and copy back what it set."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    namespace = {name: config[name] for name in settings}
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:  # whatever the file does wrong is the user's to fix, shown without our traceback
        line = getattr(e, "lineno", None) or _failing_line(e, path)
        raise UsageError(f"config file {path}{f' line {line}' if line else ''}: "
                          f"{type(e).__name__}: {e}") from None
    for name, value in namespace.items():
        if name in settings:
            config[name] = convert(settings[name], value)  # a wrong type, a tuple say, is named, not dropped
        elif not name.startswith("_") and (value is None or isinstance(value, (bool, int, float, str))):
            lookup(name, settings)  # a plain value under an unknown name is a typo: raises with close matches
        # anything else is the file's own helper: imports, functions, containers, _private names


def _failing_line(error: Exception, path: str) -> Optional[int]:
    frame = error.__traceback__
    line = None
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == path:
            line = frame.tb_lineno
        frame = frame.tb_next
    return line


def read_settings(script: str) -> dict[str, Setting]:
    """The script's annotated module-level globals (name: type = default  # comment), in source order."""
    source = Path(script).read_text(encoding="utf-8")
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    settings = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            kind, optional = parse_annotation(node.annotation, script)
            name = node.target.id
            settings[name] = Setting(name, kind, optional, comments.get(node.end_lineno, ""))
    return settings


def parse_annotation(node: ast.expr, script: str) -> tuple[type, bool]:
    """(type, optional) of int, float, bool, str, Optional[T], T | None."""
    simple = {"int": int, "float": float, "bool": bool, "str": str}
    if isinstance(node, ast.Name) and node.id in simple:
        return simple[node.id], False
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Optional":
        return parse_annotation(node.slice, script)[0], True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        if isinstance(node.right, ast.Constant) and node.right.value is None:
            return parse_annotation(node.left, script)[0], True
    raise TypeError(f"{script} line {node.lineno}: a setting must be annotated int, float, bool, str, "
                    f"Optional[...] or ... | None, not {ast.unparse(node)}")


def help_text(prog: str, settings: dict[str, Setting], config: dict, doc: Optional[str]) -> str:
    lines = [doc.strip() if doc else f"usage: python {prog} [config_file.py ...] [--key=value ...]", ""]
    lines.append("settings (default, then what it does):")
    width = max(len(f"--{name}={config[name]!r}") for name in settings)
    for name, setting in settings.items():
        lines.append(f"  {f'--{name}={config[name]!r}':<{width}}  {setting.comment}")
    return "\n".join(lines)
