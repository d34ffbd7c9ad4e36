"""Errors that point at the exact place of a problem in the user's input."""

from __future__ import annotations


class HescapeError(Exception):
    """Base class of every error the platform raises on purpose."""


class DataError(HescapeError):
    """Bad input data: names the file, the record and the field at fault.

    Parameters
    ----------
    message
        What is wrong, in words a user can act on.
    file
        The file (or directory) being read.
    record
        Row index (or record name) within the file, when the problem is in one record.
    field
        Column / key at fault.
    """

    def __init__(self, message: str, *, file=None, record=None, field=None):
        self.message = message
        self.file = None if file is None else str(file)
        self.record = record
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ConfigError(HescapeError):
    """Bad configuration: unknown registry names, malformed overrides, missing weights."""


class UnknownNameError(ConfigError, KeyError):
    """An unknown registry name; the message lists the known names."""

    def __init__(self, kind: str, name: str, known):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]
