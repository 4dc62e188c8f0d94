"""The one exception type for problems the user can fix.

Every user-facing failure is an `EbmmError`; the CLI catches it in one place and prints
`ebmm <command>: <subject>: <problem>` on one line, exiting with code 2 (bad usage or
bad input). Library code raises it and never prints.
"""

from __future__ import annotations

from pathlib import Path


class EbmmError(Exception):
    """A problem with the user's input: a file, a folder or an option value.

    Args:
        subject: what is wrong, as the user named it: a path or an option such as `--block`.
        problem: what is wrong with it, in a few words.
    """

    def __init__(self, subject: str | Path, problem: str) -> None:
        self.subject = str(subject)
        self.problem = problem
        super().__init__(f"{self.subject}: {problem}")
