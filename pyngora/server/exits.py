"""How a master ends: its exit codes (the README's "Exit codes") and the error that stops it."""
from __future__ import annotations

__all__ = ["EXIT_OK", "EXIT_CONFIG", "EXIT_USAGE", "EXIT_WORKERS", "FatalError"]

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_WORKERS = 0, 1, 2, 3


class FatalError(Exception):
    """Raised in the master's loop or start-up: the master stops with ``code`` (its workers
    killed, the launcher told why)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
