"""
The first thing each script runs, before its own imports (torch's takes seconds): from quiet_startup() until
cli.run_main takes over, Ctrl-C or SIGTERM ends the process at once, with one line on stderr and the status a shell
gives those signals, 130 or 143, never a traceback.

The stop is taken in the signal handler itself, without raising KeyboardInterrupt: an exception raised inside an
import can be dropped on the way (torch imports numpy from C and ignores whatever error that raises) or abort the
process (C++ in torch's import, calling back into Python, cannot pass it on), and before run_main nothing a script
has made can be lost. run_main's own handler stops the same way while a module is being imported. This module
imports nothing the interpreter has not loaded before any script runs, so that it is in place a millisecond after
the script starts: only Python's own start-up and the compiling of the script come before it.
"""

import os
import sys


def quiet_startup() -> None:
    """Called first thing by each script run as a program (sample.py, score.py, attention.py, bench.py)."""
    sys.excepthook = _interrupted_hook  # a Ctrl-C while `signal` itself is imported arrives as KeyboardInterrupt
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stop_now(signum))


def stop_now(signum: int) -> None:
    """End the process here, for Ctrl-C (SIGINT) or SIGTERM: the script's one line and 130 or 143. os._exit, as
    nothing is left to clean up, and Python would end a process stopped by SIGINT by SIGINT itself, which a parent
    process reads as a different status."""
    import signal  # loaded by now: quiet_startup imported it

    interrupted = signum == signal.SIGINT
    try:
        os.write(2, f"{os.path.basename(sys.argv[0])}: {'interrupted' if interrupted else 'terminated'}\n".encode())
    except OSError:  # stderr closed (2>&-)
        pass
    os._exit(130 if interrupted else 143)


def _interrupted_hook(kind: type, value: BaseException, tb: object) -> None:
    if issubclass(kind, KeyboardInterrupt):
        stop_now(2)  # SIGINT's number on every system Python runs on (signal may not be imported yet)
    sys.__excepthook__(kind, value, tb)
