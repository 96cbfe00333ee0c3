"""Where results go: an output folder or file checked before the work that fills it, with a one-line
error naming the option (not errno's words after the work is done). The bottom floor: any layer uses it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output_folder(path: str | Path, *, option: str) -> Path:
    """`path` if it is a folder, or can be made one, to write into (tried: a probe made and removed there;
    nothing is left). ValueError naming `option` where a file lies on the way or the nearest folder there
    is not writable."""
    path = Path(path)
    _check_folder(path, path, option)
    return path


def check_output_file(path: str | Path, *, option: str, example: str) -> Path:
    """`path` if a file can be written there (its folder checked as check_output_folder does); a folder
    is refused with `example` as the file's name in it."""
    path, folder = Path(path), str(path).endswith(("/", os.sep))  # (Path drops a trailing slash)
    if path.is_dir() or folder:
        raise ValueError(f"{option}: {path} is a folder; give the file to write, e.g. {path / example}")
    _check_folder(path.parent, path, option)
    return path


def _check_folder(folder: Path, shown: Path, option: str) -> None:
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option}: {shown} is a file, not a folder" if existing == shown
                         else f"{option}: {shown}: {existing} is a file, not a folder")
    try:  # made and removed at once: os.access says yes to root on /proc and the like, where nothing can be made
        os.rmdir(tempfile.mkdtemp(prefix=".dat-lab-probe-", dir=existing))
    except OSError:
        raise ValueError(f"{option}: {shown}: {existing} is not writable") from None


def make_folder(path: str | Path, *, option: str) -> Path:
    """`path` made (with its parents), or a one-line ValueError naming `option`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option}: cannot make {path} ({(err.strerror or str(err)).lower()})") from None
    return path
