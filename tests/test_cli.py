"""cli.py, called directly (in process, on a main of the test's own): the exit status and the one line of each way a
script ends, a stop signal held back until a block has written, and an OSError on stdout named. The scripts' own
signal handling, end to end, is in test_sample_bad_inputs.py."""

import os
import signal
import sys
import time

import pytest

from cli import OutOfMemory, OutputError, Terminated, memory_named, run_main, signals_held, writing_stdout
from errors import UsageError


@pytest.fixture
def ends(monkeypatch, capsys):
    """end(main): run_main(main) as `python script.py` would run it: (exit status, stderr). The signal handlers are
    restored afterwards (run_main leaves stop signals ignored once one has come, until the process ends)."""
    monkeypatch.setattr(sys, "argv", ["script.py"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def end(main) -> tuple[int, str]:
        try:
            with pytest.raises(SystemExit) as exit_info:
                run_main(main)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        return exit_info.value.code, capsys.readouterr().err

    return end


def raising(error: BaseException):
    def main() -> None:
        raise error

    return main


@pytest.mark.parametrize("error, status, err", [
    (UsageError("--x must be 1"), 2, "script.py: error: --x must be 1\n"),
    (KeyboardInterrupt(), 130, "script.py: interrupted\n"),
    (Terminated(), 143, "script.py: terminated\n"),
    (BrokenPipeError(), 141, ""),
    (OutputError("cannot write the samples to stdout: No space left on device"), 1,
     "script.py: error: cannot write the samples to stdout: No space left on device\n"),
    (OutOfMemory("out of memory (an allocation of 5 MB failed): lower --x"), 1,
     "script.py: error: out of memory (an allocation of 5 MB failed): lower --x\n"),
    # an allocation that no memory_named block names: Python's own, torch's on the CPU and on CUDA
    (MemoryError(), 1, "script.py: error: out of memory (MemoryError): lower the sizes the settings ask for, or free "
                       "some memory\n"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 1827545548 bytes. Error code 12 (Cannot allocate memory)"), 1,
     "script.py: error: out of memory (an allocation of 1,828 MB failed): lower the sizes the settings ask for, or "
     "free some memory\n"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)\nmore"), 1,
     "script.py: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total "
     "capacity)): lower the sizes the settings ask for, or free some memory\n"),
])
def test_each_ending_has_its_status_and_line(ends, error, status, err):
    assert ends(raising(error)) == (status, err)


def test_other_runtime_errors_pass_on(ends):
    with pytest.raises(RuntimeError, match="a bug"):
        ends(raising(RuntimeError("a bug")))


def test_memory_named_says_the_setting_to_lower():
    with pytest.raises(OutOfMemory, match=r"^out of memory \(MemoryError\): lower --length$"):
        with memory_named("lower --length"):
            raise MemoryError
    with pytest.raises(ValueError):
        with memory_named("lower --length"):
            raise ValueError("not memory")


def test_main_returns_its_status(ends):
    assert ends(lambda: None) == (0, "")
    assert ends(lambda: 3) == (3, "")


@pytest.mark.parametrize("signals, status, line", [
    ([signal.SIGTERM], 143, "script.py: terminated\n"),
    ([signal.SIGINT, signal.SIGTERM], 130, "script.py: interrupted\n"),  # the second is part of the same stop
])
def test_a_stop_inside_signals_held_waits_for_the_end_of_the_block(ends, signals, status, line):
    written = []

    def main() -> None:
        with signals_held():
            for s in signals:
                os.kill(os.getpid(), s)
                time.sleep(0.05)  # the handler runs here, inside the block
            written.append("the whole step")
        written.append("the next step")

    assert ends(main) == (status, line)
    assert written == ["the whole step"]


def test_writing_stdout_names_what_it_could_not_write():
    with pytest.raises(OutputError, match="^cannot write the samples to stdout: No space left on device$"):
        with writing_stdout("the samples "):
            raise OSError(28, "No space left on device")
    with pytest.raises(BrokenPipeError):  # passed on, for run_main to end quietly
        with writing_stdout("the samples "):
            raise BrokenPipeError
