"""
How a script runs as a command: its exit statuses, its signals, and stdout's faults.

A script calls startup.quiet_startup() first thing (before torch's slow import), then, once configurator.configure
has read its settings, run_main(main), which runs the script and turns what ends it into one line and an exit status:
a UsageError 2, Ctrl-C 130, SIGTERM 143 (both raised in the main thread, so a script can catch them and keep its
work first), a reader leaving the pipe 141, a full disk or memory that ran out 1. signals_held keeps a stop signal
back while a block writes, writing_stdout names what could not be written, and memory_named the setting to lower
when an allocation fails.
"""

import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

from errors import UsageError
from startup import stop_now


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


class OutOfMemory(Exception):
    """An allocation failed although the work was planned to fit the memory available (another program took some
    meanwhile, or a limit that could not be read): run_main reports it, with the setting to lower, and exits with
    status 1, as for a full disk."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_STOP_SECONDS = 1.0  # a stop signal this soon after another is part of the same stop
# signals_held's nesting, the stop it keeps back until its end, and when the last stop signal came
_stops = {"depth": 0, "pending": None, "last": -math.inf}


def _on_stop_signal(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: stop the work where it is. One that follows within a second belongs to the same stop (Ctrl-C
    pressed twice, `kill` after Ctrl-C) and is ignored, so that it cannot cut short the writing of what was made; a
    later one stops again. One that lands inside an import ends the process at once, as during start-up
    (startup.py): raised there, it could be dropped or abort the process, and imports come before the work (torch's
    as main starts, generate.py's at the first step), so no work is lost."""
    now = time.monotonic()
    if now - _stops["last"] < SAME_STOP_SECONDS:
        return
    _stops["last"] = now
    stop = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
    if _stops["depth"]:
        _stops["pending"] = _stops["pending"] or stop
        return
    if inside_import(frame):
        stop_now(signum)
    raise stop


def inside_import(frame: Any) -> bool:
    """Whether the code that frame runs is part of an import: importlib's own frames are below it."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


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
    except OutOfMemory as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:  # an allocation that no script's memory_named block named
        if not out_of_memory(e):
            raise
        print(f"{prog}: error: {memory_failure(e)}: lower the sizes the settings ask for, or free some memory",
              file=sys.stderr)
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


@contextmanager
def memory_named(advice: str) -> Iterator[None]:
    """An allocation that fails in the block (Python's, or torch's on the CPU, a GPU or MPS) becomes an OutOfMemory
    saying what failed, then advice: the setting to lower."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        raise OutOfMemory(f"{memory_failure(e)}: {advice}") from None


def out_of_memory(error: BaseException) -> bool:
    """Whether error is an allocation that failed: MemoryError, or torch's allocators' RuntimeError ("can't allocate
    memory" on the CPU, "out of memory" on CUDA, where it is torch.OutOfMemoryError, and on MPS)."""
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def memory_failure(error: BaseException) -> str:
    """What ran out, in a few words: torch's CPU allocator says how much it asked for, in bytes."""
    asked = re.search(r"allocate (\d+) bytes", str(error))
    if asked:
        return f"out of memory (an allocation of {int(asked[1]) / 1e6:,.0f} MB failed)"
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return f"out of memory ({first})"


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
