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
cli.run_main(main) then runs the script (cli.py: exit statuses and signals).
"""

import ast
import difflib
import io
import math
import sys
import tokenize
from ast import literal_eval
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from cli import exit_with_usage_error
from errors import UsageError

BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


@dataclass
class Setting:
    name: str
    kind: type  # int, float, bool or str
    optional: bool  # None is allowed
    comment: str


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
            if value.bit_length() > 128:  # past any count or size, and perhaps past what Python prints (4,300 digits)
                raise UsageError(f"{setting.name} expects an int of 128 bits at most, got one of "
                                 f"{value.bit_length():,} bits")
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
