"""Reading the YAML files users give (training configs, sweep specs, released configs), with one-line
errors that name the file and, for bad YAML, the place; and the hint for numbers YAML read as text. The
bottom floor, imported by every layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last, silently:
    `seeds: [0, 1]` then `seeds: [0]` planned one seed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be given again
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):  # (a list or mapping as a key)
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice; give it once", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load of `text`, a key given twice refused as in read_yaml (yaml.YAMLError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def read_yaml(path: str | Path, *, expected: str) -> Any:
    """The document in `path` (None when empty). A ValueError in one line where it is no YAML,
    "<path> is not valid YAML (<problem> at line L, column C)" (a key given twice in a mapping too), or
    no text, "<path> is not a text file (give <expected>)"; OSError (no such file, ...) as raised."""
    try:
        with open(path, encoding="utf-8") as f:
            return load_yaml(f.read())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (give {expected})") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML ({problem}{where})") from None


def float_hint(value: Any) -> str:
    """" (YAML reads 1e-4 as text: write 1.0e-4)" where `value` is a number that YAML 1.1 read as a string
    for want of a dot or an exponent's sign; else ""."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    mantissa, e, exponent = value.lower().partition("e")
    if not e:
        return ""
    sign = "" if exponent[:1] in "+-" else "+"  # YAML 1.1 reads 1.0e5 as text too
    return f" (YAML reads {value} as text: write {mantissa if '.' in mantissa else mantissa + '.0'}e{sign}{exponent})"
