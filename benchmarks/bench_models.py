"""dat_tiny against timm's swin_tiny_patch4_window7_224: training (forward, backward, AdamW step) and
inference images/s, and peak memory, at several batch sizes; both models in one process, alternating.

    python benchmarks/bench_models.py [--device cpu|cuda] [--batch 8 32] [--precision bf16] \
        [--channels-last] [--compile] [--flush-denormal] [--mode train infer] [--repeats 5] \
        [--sampler auto|grid_sample|dense|triton|native] [--kernel auto|matmul|sdpa] [--md docs/benchmarks.md] \
        [--dat-settings BACKWARD=loop/PRECISION=ieee KERNEL=matmul ...]   # more dat_tiny contenders: other
        # Triton settings (bench_bias.py's notation), and KERNEL= / SAMPLER= for the deformable blocks' options
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bias import parse, use  # noqa: E402
from common import (add_output_options, add_path_options, alternate, cuda_peak_mb, in_subprocess, machine,  # noqa: E402
                    markdown, path_options, peak_rss_delta_mb, write)

import dat_lab  # noqa: E402,F401  (registers dat_tiny with timm)
from dat_lab.models.attention import set_deformable_options  # noqa: E402

MODELS = {"dat_tiny": "dat_tiny", "swin_tiny": "swin_tiny_patch4_window7_224"}


BLOCK_OPTIONS = {"KERNEL": "kernel", "SAMPLER": "sampler"}  # in a setting: options of the deformable blocks


def split(setting: str) -> tuple[dict[str, str], str]:
    """"KERNEL=matmul/BACKWARD=loop" -> ({"kernel": "matmul"}, "BACKWARD=loop"): the deformable blocks'
    options, and the Triton bias setting (bench_bias.py's notation; "default" when none)."""
    items = [] if setting == "default" else setting.split("/")
    options = {BLOCK_OPTIONS[n]: v for n, _, v in (i.partition("=") for i in items) if n in BLOCK_OPTIONS}
    return options, "/".join(i for i in items if i.partition("=")[0] not in BLOCK_OPTIONS) or "default"


def check(setting: str, script: str) -> None:
    """Exit with one line unless `setting` (split's notation) is well formed, before anything runs."""
    block_options, triton = split(setting)
    parse(triton)
    try:
        set_deformable_options(torch.nn.Module(), **block_options)
    except ValueError as err:
        raise SystemExit(f"{script}: setting {setting!r}: {err}") from None


def build(name: str, batch: int, a: argparse.Namespace, train: bool, setting: str = "default"):
    """A training step or an inference pass of model `name`; `setting`: of the Triton bias kernels
    (bench_bias.py's notation), set before each call, so contenders with other settings alternate, and
    KERNEL= / SAMPLER= items, the deformable blocks' options (over --kernel and --sampler)."""
    torch.manual_seed(0)
    model = timm.create_model(MODELS[name], num_classes=1000).to(a.device)
    options, setting = split(setting)
    set_deformable_options(model, **{"sampler": a.sampler, "kernel": a.kernel, **options})
    x = torch.randn(batch, 3, 224, 224, device=a.device)
    if a.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    net = torch.compile(model) if a.compile else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.precision)
    autocast = (lambda: torch.autocast(a.device, dtype=dtype)) if dtype else contextlib.nullcontext
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train(train)

    def run() -> None:
        use(setting)
        if train:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = net(x).float().logsumexp(-1).mean()
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad(), autocast():
                net(x)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) for both models (x86: denormal floats are slow)")
    p.add_argument("--mode", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    add_path_options(p, "dat_tiny's deformable blocks")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--setting", default="default", help="dat_tiny's Triton bias setting (bench_bias.py's notation)")
    p.add_argument("--dat-settings", nargs="*", default=[],
                   help="more dat_tiny contenders, each with these settings: of the Triton bias (bench_bias.py's "
                        "notation), KERNEL= and SAMPLER= (the deformable blocks' options), joined by /")
    add_output_options(p, "models")
    p.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.flush_denormal:
        torch.set_flush_denormal(True)
    if a.measure_memory:
        name, batch, mode = a.args
        fn = lambda: build(name, int(batch), a, mode == "train", a.setting)  # noqa: E731
        print(cuda_peak_mb(fn()) if a.device == "cuda" else peak_rss_delta_mb(fn))
        return
    options = f"{a.precision}" + (", channels_last" if a.channels_last else "") + (", compiled" if a.compile else "") \
        + (", denormals flushed" if a.flush_denormal else "") \
        + path_options(a) + ("" if a.setting == "default" else f", Triton setting {a.setting}")
    results = {"machine": machine(a.device), "device": a.device, "options": options, "rows": []}
    flags = ["--device", a.device, "--precision", a.precision] + (["--channels-last"] if a.channels_last else []) \
        + (["--compile"] if a.compile else []) + (["--flush-denormal"] if a.flush_denormal else []) \
        + ["--sampler", a.sampler, "--kernel", a.kernel, "--setting", a.setting]
    for setting in [a.setting, *a.dat_settings]:
        check(setting, "bench_models.py")  # a malformed setting fails here, before any timing
    for batch in a.batch:
        for mode in a.mode:
            runs = {n: build(n, batch, a, mode == "train", a.setting) for n in MODELS}
            runs |= {f"dat_tiny[{s}]": build("dat_tiny", batch, a, mode == "train", s) for s in a.dat_settings}
            times = alternate(runs, repeats=a.repeats, device=a.device)
            row = {"batch": batch, "mode": mode, **{f"{n}_images_per_s": batch / t for n, t in times.items()}}
            print(batch, mode, {n: round(batch / t, 1) for n, t in times.items()}, flush=True)
            row["ratio"] = row["dat_tiny_images_per_s"] / row["swin_tiny_images_per_s"]
            if not a.no_memory:
                for n in MODELS:
                    row[f"{n}_peak_mb"] = in_subprocess(__file__, *flags, n, str(batch), mode)
            results["rows"].append(row)
    table = markdown(f"dat_tiny vs swin_tiny ({a.device}, {options}, medians of {a.repeats})", results["machine"],
                     ["batch", "mode", "dat_tiny (img/s)", "swin_tiny (img/s)", "dat/swin", "dat peak (MB)",
                      "swin peak (MB)"],
                     [[str(r["batch"]), r["mode"], f"{r['dat_tiny_images_per_s']:.2f}",
                       f"{r['swin_tiny_images_per_s']:.2f}", f"{r['ratio']:.2f}x",
                       *(f"{r[k]:.0f}" if k in r else "-" for k in ("dat_tiny_peak_mb", "swin_tiny_peak_mb"))]
                      for r in results["rows"]]
                     + [[str(r["batch"]), f"{r['mode']}, dat_tiny with {s}", f"{r[f'dat_tiny[{s}]_images_per_s']:.2f}",
                         f"{r['swin_tiny_images_per_s']:.2f}",
                         f"{r[f'dat_tiny[{s}]_images_per_s'] / r['swin_tiny_images_per_s']:.2f}x", "-", "-"]
                        for r in results["rows"] for s in a.dat_settings])
    section = f"models-{a.device}" + ("" if a.precision == "fp32" else f"-{a.precision}") \
        + ("-channels-last" if a.channels_last else "") + ("-compiled" if a.compile else "") \
        + ("-flush-denormal" if a.flush_denormal else "") + "".join(f"-{v}" for v in (a.sampler, a.kernel) if v != "auto") \
        + ("" if set(a.mode) == {"train", "infer"} else "-" + "-".join(a.mode))  # one Markdown section per setting
    write(results, Path(a.json), Path(a.md) if a.md else None, section, table)


if __name__ == "__main__":
    main()
