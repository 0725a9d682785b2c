"""Reading YAML a user wrote: safe tags only, no aliases, no duplicate keys, and errors that give file, line and column.

PyYAML's SafeLoader already refuses `!!python/...` tags; this loader also refuses aliases (a few lines of `&a [*a, *a]`
expand to billions of nodes), duplicate keys (PyYAML keeps the last one silently) and non-string keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlError(ValueError):
    """A YAML text that cannot be read as plain data; the message gives the source, line and column."""


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(
                None, None, f"anchor or alias {event.anchor!r} is not supported: write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        _no_base60(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        _no_base60(node)
        return super().construct_yaml_float(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is not a name (keys are plain words)", key_node.start_mark
                )
            if key in seen:
                first = seen[key].line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first}); keep one", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _no_base60(node: yaml.ScalarNode) -> None:
    if ":" in str(node.value):  # YAML 1.1 reads 1:30 as 90 (base 60): surely not what was meant
        raise yaml.constructor.ConstructorError(
            None,
            None,
            f"{node.value!r} is a base-60 number in YAML 1.1; quote it or write a plain number",
            node.start_mark,
        )


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)


def _load_one(text: str) -> Any:
    # What yaml.load does, with _StrictLoader (a SafeLoader subclass: no Python tags) as the only loader.
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def loads(text: str, source: str) -> Any:
    """Plain data (dicts, lists, scalars) from one YAML document; `source` names it in errors."""
    try:
        return _load_one(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = e.problem or e.context or "invalid YAML"
        if "expected a single document" in str(e):
            problem = "holds several YAML documents (---); keep one"
        raise YamlError(f"{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{source}: {e}") from None
    except RecursionError:
        raise YamlError(f"{source}: nested too deeply to read") from None


def read_text(path: Path) -> str:
    """A UTF-8 text file; a file that is not readable or not UTF-8 is named with the byte offset and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise YamlError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise YamlError(f"{path}: not UTF-8 text (byte {e.start}, line {line}); save the file as UTF-8") from None


def load(path: Path) -> Any:
    return loads(read_text(path), str(path))
