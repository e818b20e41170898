"""The one exception the trainer raises for failures it understands.

The entry point catches it, writes the termination message and exits with ``code``, so the
operator can tell a retryable failure from a permanent one.
"""

from __future__ import annotations

from kdistill.api.failures import ExitCode


class TrainerError(Exception):
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"
