"""
The one error a user can fix: UsageError, raised by the library modules (load.py's LoadError and tokenizer.py's
TokenizerError are ones) and by the scripts, and reported by cli.run_main as one paragraph and exit status 2.
"""


class UsageError(Exception):
    """A user's mistake (a setting, a file, the model asked for); the message says which and how to fix it.

    Every script prints it the same way, through cli.run_main: one paragraph on stderr, no traceback, exit status 2.
    """
