"""dat-lab: the one command-line face of the toolkit.

    dat-lab profile VARIANT [--set key=value ...] [--img-size N] [--json]
    dat-lab profile --paper-tables [--json]
    dat-lab convert RELEASED.pth (--variant NAME | --official-config FILE.yaml) -o OUT.ckpt

Bad input ends with one line, `dat-lab: error: ...`, and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from typing import Any, Sequence

import yaml


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs; values read as YAML, so `offset_range=4` and `groups=[1,2,3,6]` work."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _profile(args: argparse.Namespace) -> None:
    import dat_lab
    from dat_lab.ablations import paper_rows
    from dat_lab.profile import profile_model

    if args.paper_tables:
        if args.variant or args.set or args.img_size:
            raise ValueError("--paper-tables takes no VARIANT, --set or --img-size (its rows are fixed deltas of dat_tiny)")
        rows = []
        for row in paper_rows():
            p = profile_model(dat_lab.create_model(row.config()))
            rows.append({"table": row.table, "row": row.row, "params_m": round(p.params_m, 4),
                         "gflops": round(p.gflops, 4), "paper_params_m": row.paper_params_m,
                         "paper_gflops": row.paper_gflops})
    else:
        if not args.variant:
            raise ValueError("profile: give a VARIANT (one of " + ", ".join(dat_lab.VARIANTS) + ") or --paper-tables")
        config = dat_lab.get_config(args.variant, **_parse_sets(args.set))
        if args.img_size:
            config = dat_lab.replace_config(config, img_size=args.img_size)
        p = profile_model(dat_lab.create_model(config))
        rows = [{"model": args.variant, "img_size": config.img_size, "params_m": round(p.params_m, 4),
                 "gflops": round(p.gflops, 4)}]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    _print_table(rows)


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for key in rows[0]:
        table.add_column(key, justify="left" if key in ("row", "model") else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def _read_official_config(path: str) -> dict[str, Any]:
    """The model keywords of a released config YAML (MODEL: DAT: {...}) or of a flat YAML dict."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if "MODEL" in data:
        data = data["MODEL"].get("DAT", {})
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--official-config: {path} holds no MODEL.DAT keywords")
    return {k.lower(): v for k, v in data.items()}


def _convert(args: argparse.Namespace) -> None:
    import dat_lab
    from dat_lab.models.convert import official_state_dict

    if bool(args.variant) == bool(args.official_config):
        raise ValueError("convert: give exactly one of --variant NAME or --official-config FILE.yaml")
    config = (dat_lab.get_config(args.variant) if args.variant
              else dat_lab.config_from_official(_read_official_config(args.official_config)))
    state = official_state_dict(args.checkpoint)
    model = dat_lab.load_official(dat_lab.create_model(config), state)
    dat_lab.save_checkpoint(model, args.output, source=str(args.checkpoint))
    print(f"wrote {args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


def _train(argv: list[str]) -> int:
    """LightningCLI takes over: `dat-lab train [fit|validate|test] --config X.yaml [--model.* ...]`."""
    from dat_lab.training.cli import main as train_main
    from dat_lab.training.module import NonFiniteLossError

    sys.argv = ["dat-lab train"]  # LightningCLI reads its arguments from `argv` alone (and names itself so)
    try:
        train_main(argv)
    except (ValueError, NonFiniteLossError) as err:  # bad config or data (DataError), diverged training
        print(f"dat-lab: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dat-lab", description="Ablations of Deformable Attention Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", add_help=False,
                   help="train with LightningCLI: dat-lab train [fit|validate|test] --config experiments/X.yaml "
                        "(see dat-lab train --help)")

    p = sub.add_parser("profile", help="parameters and GFLOPs (paper convention) of a model or the paper's rows")
    p.add_argument("variant", nargs="?", help="a named variant, e.g. dat_tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable; per-stage knobs take one value or a list, e.g. groups=[1,2,3,6]")
    p.add_argument("--img-size", type=int, help="input size (default: the variant's)")
    p.add_argument("--paper-tables", action="store_true", help="every row of the paper's Tables 6 and 7")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_profile)

    c = sub.add_parser("convert", help="released DAT weights to a dat-lab checkpoint")
    c.add_argument("checkpoint", help="released .pth (a dict with a `model` key, or a bare state dict)")
    c.add_argument("--variant", help="the variant the weights belong to, e.g. dat_tiny")
    c.add_argument("--official-config", help="the released config YAML the weights were trained with")
    c.add_argument("-o", "--output", required=True, help="where to write the converted checkpoint")
    c.set_defaults(run=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, pickle.UnpicklingError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"dat-lab: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
