"""A registry of types by name (replication-log types, site-link types), as the
seed registers its ``dm_repl_log_type`` and ``dm_repl_slink_type`` ops.

Built-in types are named by ``"module:attribute"`` and imported on first use, so
that the table grammar can ask which names exist without importing the engine.
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

F = TypeVar("F")


class Registry(Generic[F]):
    def __init__(self, kind: str, builtin: dict[str, str]) -> None:
        self.kind = kind  # what a name names, for errors: "site-link type"
        self._types: dict[str, F | str] = dict(builtin)

    def register(self, name: str, factory: F) -> None:
        if name in self._types:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._types[name] = factory

    def unregister(self, name: str) -> None:
        self._types.pop(name, None)

    def registered(self) -> list[str]:
        return list(self._types)

    def factory(self, name: str) -> F:
        """The factory of a registered type (KeyError: none of that name)."""
        found = self._types[name]
        if isinstance(found, str):
            module, _, attr = found.partition(":")
            found = getattr(importlib.import_module(module), attr)
            self._types[name] = found
        return found
