"""The paper's offset-range figure from a study of sweeps/offset_range.yaml: top-1 against s,
mean and sd over seeds, the baseline (s = 2) starred.

    python analysis/offset_range_plot.py offset_range [--storage URL] [--out runs/offset_range/analysis]
"""

import argparse

from dat_lab.analysis.plots import factor_plot
from dat_lab.analysis.study import load, trials_frame
from dat_lab.figures import save_figure
from dat_lab.outputs import check_output_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study")
    parser.add_argument("--storage", help="default: sqlite:///runs/<study>.db")
    parser.add_argument("--factor", default="s", help="the offset-range factor of the spec (default: s)")
    parser.add_argument("--out", help="default: runs/<study>/analysis")
    args = parser.parse_args()
    try:  # one line, as dat-lab's errors
        out = check_output_folder(args.out or f"runs/{args.study}/analysis", option="--out")
        study, info = load(args.study, args.storage)
        if not info.grid:
            raise ValueError(f"study {args.study!r} is a search: it has no factors (plot a grid over the offset range, "
                             f"e.g. sweeps/offset_range.yaml)")
        if args.factor not in info.factors:
            raise ValueError(f"study {args.study!r} has no factor {args.factor!r} (it has: "
                             f"{', '.join(info.factors) or 'none'})")
        paths = save_figure(factor_plot(trials_frame(study, info), info, args.factor), out, "offset_range")
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
