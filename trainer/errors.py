"""The one error type for user mistakes, and the did-you-mean helper it uses."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to a misspelt one, best first."""
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)


class ConfigError(Exception):
    """A user mistake in a config, an override or a command-line argument.

    Carries the dotted config path of the problem (``optimizer.lr``) and a
    suggestion; the CLI prints it as one ``error:`` line and exits with code 2.
    """

    def __init__(self, path: str, message: str, *, suggestion: str | None = None,
                 choices: Iterable[str] | None = None, given: str | None = None,
                 hint: str | None = None):
        self.path = path
        self.message = message
        if suggestion is None and choices is not None:
            choices = sorted(choices)
            near = closest(given, choices) if given is not None else []
            known = ", ".join(choices) if choices else "(none)"
            suggestion = (f"did you mean {' or '.join(repr(c) for c in near)}? " if near else "") + f"valid: {known}"
        if hint:
            suggestion = f"{suggestion}; {hint}" if suggestion else hint
        self.suggestion = suggestion
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        tail = f" ({self.suggestion})" if self.suggestion else ""
        return f"{where}{self.message}{tail}"

    def under(self, prefix: str) -> ConfigError:
        """The same error with its path placed under ``prefix`` (``lr`` -> ``optimizer.lr``)."""
        path = f"{prefix}.{self.path}" if self.path else prefix
        return ConfigError(path, self.message, suggestion=self.suggestion)
