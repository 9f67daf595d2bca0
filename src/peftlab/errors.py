"""The two kinds of failure peftlab distinguishes, and the exit codes the CLI maps them to.

Bad input (a config key, a data file, an asset) is the user's to fix and must be reported before
any training starts, naming the file/key/line: `InputError` -> exit code 2. A run that breaks while
training is recorded in its `status.json` and the other runs go on: `RunFailed` -> exit code 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input: the message names where (file, key, line) and what was expected."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        text = message if not self.problems else message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class RunFailed(Exception):
    """One or more runs failed; each one's error is in its status.json."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
