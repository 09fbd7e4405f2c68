"""Reading YAML the platform did not write itself (presets, config files, overrides, search spaces, stored
configs) with bounds: a file of a few hundred bytes must not be able to take all memory or time.

PyYAML's safe loader expands aliases into shared references, so a short file of nested aliases (a "billion
laughs") turns into a structure whose traversal or printing never ends. Config files here have no use for
aliases: they are refused, and so is nesting deeper than :data:`MAX_DEPTH` and text longer than
:data:`MAX_CHARS`. The errors are ``yaml.YAMLError``s, which every reader already turns into a message
naming the file.
"""
from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 32  # mappings and lists inside each other (a config is 3 deep)
MAX_CHARS = 1 << 20  # 1 MiB of YAML text


class BoundedYAMLError(yaml.YAMLError):
    """YAML refused by :func:`load_yaml`'s bounds; the message says which and where."""


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader without aliases and with a nesting limit."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise BoundedYAMLError(f"line {event.start_mark.line + 1}: an alias (*{event.anchor}) is not accepted "
                                   "here; write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise BoundedYAMLError(f"line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str | bytes) -> Any:
    """The value of one YAML document, read with the safe loader and the bounds above (``None`` for an empty
    document). Raises ``yaml.YAMLError`` (a :class:`BoundedYAMLError` for a bound)."""
    if len(text) > MAX_CHARS:
        raise BoundedYAMLError(f"{len(text)} characters, more than the {MAX_CHARS} a config file may have")
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
