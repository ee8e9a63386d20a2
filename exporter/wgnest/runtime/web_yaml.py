"""The web config's YAML, read as exporter-toolkit's Go reader reads it (imported only when
a web config is given: PyYAML costs a serving process ~2.5 MiB)."""

from __future__ import annotations

from typing import Any

import yaml

try:  # libyaml's parser: 5x faster, and it refuses nesting deeper than 1000 levels
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class YamlProblem(Exception):
    """Why the text is no YAML, in one line that quotes none of it (it may hold a secret)."""


class _Loader(_SafeLoader):
    """A safe loader whose mapping keys are strings as written, refused when given twice.

    Every mapping in the file is string-keyed in exporter-toolkit (struct fields and
    map[string]...), and Go's YAML reader fills a string with the scalar as written: `0x1F:`
    is the user "0x1F" and `010:` the user "010", not 31 and 8; `010` and `8` are two users.
    """


_NULL_TAG = "tag:yaml.org,2002:null"


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)  # `<<: *anchor` merge keys, as Go's YAML reader has them
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a string, not a list or mapping", key_node.start_mark)
        # A null key (`~:`) is Go's empty string; anything else is the text as written.
        key = "" if key_node.tag == _NULL_TAG else str(key_node.value)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(data: bytes) -> Any:
    """The document, with the loader above (a safe one). Raises YamlProblem."""
    try:
        return yaml.load(data, Loader=_Loader)
    except yaml.MarkedYAMLError as e:  # no snippet: the line may hold a secret
        mark = e.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise YamlProblem(f"{e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise YamlProblem(str(e)) from None
    except RecursionError:
        raise YamlProblem("nested too deeply") from None
