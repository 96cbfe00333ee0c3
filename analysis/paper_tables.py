"""Tables 6 and 7 of the paper laid out as in the paper, this study's numbers beside the paper's.

    python analysis/paper_tables.py table7_stages [--storage sqlite:///runs/table7_stages.db]

The study must come from sweeps/table6_geometry.yaml or sweeps/table7_stages.yaml (any scale).
"""

import argparse

from dat_lab.analysis.study import load, trials_frame
from dat_lab.analysis.tables import markdown, paper_layout, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study")
    parser.add_argument("--storage", help="default: sqlite:///runs/<study>.db")
    args = parser.parse_args()
    try:  # one line, as dat-lab's errors
        study, info = load(args.study, args.storage)
        layout = paper_layout(summarize(trials_frame(study, info), info), info)
        if layout is None:
            raise ValueError(f"study {args.study!r} is not one of the paper's tables (a factor with paper_table: 6 or 7)")
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(markdown(layout, left=1))  # as `dat-lab analyze` writes paper_table.md


if __name__ == "__main__":
    main()
