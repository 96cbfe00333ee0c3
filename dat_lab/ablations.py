"""The paper's ablation rows (Tables 6 and 7 of PAPER_TABLES.md) as named config deltas from
`dat_tiny`: the one source that `dat-lab profile --paper-tables` and the sweeps read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .models import DATConfig, get_config

BASE_MODEL = "dat_tiny"


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table: its label, the delta from dat_tiny, and the paper's numbers."""

    table: int
    row: str
    delta: dict[str, Any] = field(default_factory=dict)
    paper_params_m: float = 0.0
    paper_gflops: float = 0.0
    paper_top1: float = 0.0

    def config(self, base: str | DATConfig = BASE_MODEL) -> DATConfig:
        return get_config(base, **self.delta)


_NO_OFFSETS = {"offsets": False}
# Table 7: stages 0-1 deformable need r = 4, 2 and groups 1, 2, 3, 6 to give the paper's FLOPs.
_DEFORMABLE_01 = {"key_downsample": [4, 2, 1, 1], "groups": [1, 2, 3, 6]}

PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow(6, "S / no offsets / none", {**_NO_OFFSETS, "position": "none"}, 28.29, 4.57, 81.4),
    PaperRow(6, "S / no offsets / relative", {**_NO_OFFSETS}, 28.32, 4.57, 81.7),
    PaperRow(6, "S / offsets / none", {"position": "none"}, 28.29, 4.58, 81.7),
    PaperRow(6, "S / offsets / fixed", {"position": "fixed"}, 29.73, 4.58, 81.8),
    PaperRow(6, "S / offsets / dwconv", {"position": "dwconv"}, 28.31, 4.59, 81.8),
    PaperRow(6, "P / offsets / relative", {"blocks": ["P", "P", "LD", "LD"], "sr_ratio": [8, 4, 1, 1]},
             30.68, 4.48, 81.7),
    PaperRow(6, "S / offsets / relative (DAT-T)", {}, 28.32, 4.59, 82.0),
    PaperRow(7, "D D D D", {"blocks": ["LD", "LD", "LD", "LD"], **_DEFORMABLE_01}, 28.39, 4.64, 81.7),
    PaperRow(7, "- D D D", {"blocks": ["LS", "LD", "LD", "LD"], **_DEFORMABLE_01}, 28.34, 4.60, 81.9),
    PaperRow(7, "- - D D (DAT-T)", {}, 28.32, 4.59, 82.0),
    PaperRow(7, "- - - D", {"blocks": ["LS", "LS", "LS", "LD"]}, 28.29, 4.51, 81.4),
    PaperRow(7, "- - - - (Swin-T)", {"blocks": "LS"}, 28.29, 4.51, 81.3),
)


def paper_rows(table: int | None = None) -> list[PaperRow]:
    """The rows of one table (6 or 7), or of both, in the paper's order."""
    if table not in (None, 6, 7):
        raise ValueError(f"table: {table!r} is not one of 6, 7")
    return [r for r in PAPER_ROWS if table is None or r.table == table]
