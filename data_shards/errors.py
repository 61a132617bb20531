"""The one error type for what the user can fix. It lives in the bottom layer so that every
layer (data_shards, trainer, launch) raises the same type and the CLI catches one."""

from __future__ import annotations


class ValleyForgeError(Exception):
    """A user's mistake or the user's environment: a bad config value, a bad input file or sample,
    a service that cannot be reached. The message is one line that names the file, sample key or
    config field (and what to do about it); the CLI prints it without a traceback.

    Anything else is a bug and keeps its traceback: raise ValleyForgeError only for what the user
    can fix, and use `assert` for internal invariants.

    `exit_code` is the CLI's exit status: 2 for a bad config, argument or input; a subclass for a
    service or a run that failed sets 1.
    """

    exit_code = 2
