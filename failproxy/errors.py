"""The error a configuration problem raises: at the bottom of the package, so that config.py
and what it validates with (tls.py) both raise it without importing each other."""

from __future__ import annotations


class ConfigError(Exception):
    """Raised by `config.load`; `problems` holds one line per problem, each naming its key
    path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
