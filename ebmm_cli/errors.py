"""The one exception type for problems the user can fix.

Every user-facing failure is an `EbmmError`; the CLI catches it in one place and prints
`ebmm <command>: <subject>: <problem>` on one line, exiting with code 2 (bad usage or
bad input) or 1 (a runtime failure, such as a write that overflows). Library code raises
it and never prints.
"""

from __future__ import annotations

from pathlib import Path


class EbmmError(Exception):
    """A problem with the user's input: a file, a folder or an option value.

    Args:
        subject: what is wrong, as the user named it: a path or an option such as `--block`.
        problem: what is wrong with it, in a few words.
        exit_code: 2 for bad usage or input, 1 for a failure while running.
    """

    def __init__(self, subject: str | Path, problem: str, exit_code: int = 2) -> None:
        self.subject = str(subject)
        self.problem = problem
        self.exit_code = exit_code
        super().__init__(f"{self.subject}: {problem}")
