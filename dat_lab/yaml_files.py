"""Reading the YAML files users give (training configs, sweep specs, released configs), with one-line
errors that name the file and, for bad YAML, the place: the bottom floor, imported by every layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, *, expected: str) -> Any:
    """The document in `path` (None when empty). A ValueError in one line where it is no YAML,
    "<path> is not valid YAML (<problem> at line L, column C)", or no text, "<path> is not a text file
    (give <expected>)"; OSError (no such file, ...) as raised."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (give {expected})") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML ({problem}{where})") from None
