"""Shared by the benchmarks: alternating timed runs with medians, peak memory, machine name, the
deformable-path options, output. Benchmarks are not tests: they measure, print, and write JSON and
Markdown; nothing asserts a timing."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from dat_lab.models.attention import KERNELS, SAMPLERS


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def add_path_options(parser, blocks: str) -> None:
    """--sampler and --kernel: options of the fast deformable path (see set_deformable_options)."""
    parser.add_argument("--sampler", default="auto", choices=SAMPLERS, help=f"sampling of {blocks}")
    parser.add_argument("--kernel", default="auto", choices=KERNELS, help=f"attention kernel of {blocks}")


def add_output_options(parser, name: str, section: str | None = None) -> None:
    """--json (default benchmarks/results/<name>.json) and --md: where a benchmark's results go."""
    parser.add_argument("--json", default=f"benchmarks/results/{name}.json")
    parser.add_argument("--md", help=f"update this Markdown file's {section or name} section (e.g. docs/benchmarks.md)")


def path_options(a) -> str:
    """The non-default --sampler / --kernel as ", sampler dense, kernel sdpa" for table titles."""
    return "".join(f", {k} {v}" for k, v in (("sampler", a.sampler), ("kernel", a.kernel)) if v != "auto")


def relative_errors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the largest |actual - expected| relative to max(1, the largest |expected|)."""
    return {n: ((actual[n] - e).abs().max() / e.abs().max().clamp_min(1.0)).item() for n, e in expected.items()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(runs: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 2, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each callable, run in turns (a, b, a, b, ...) so drift hits all alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_rss_delta_mb(build: Callable[[], Callable[[], None]]) -> float:
    """CPU: the peak growth of resident memory during one call (a warm-up call first), sampled every
    0.2 ms by a thread. Run in a fresh process with large allocations mmapped (see `in_subprocess`),
    so that freed tensors leave the resident set and the samples follow the live tensors."""
    fn = build()
    fn()  # warm-up: one-time buffers (kernels, caches) are not the pass's memory
    before, peak, done = _resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample)
    thread.start()
    fn()
    done.set()
    thread.join()
    return max(0, peak[0] - before) / 2**20


def cuda_peak_mb(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def in_subprocess(script: str, *args: str) -> float:
    """Run `script --measure-memory ARGS` in a fresh interpreter; it prints one number (MB)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big tensors mmapped: freed memory leaves the RSS
    out = subprocess.run([sys.executable, script, "--measure-memory", *args], capture_output=True, text=True,
                         check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def markdown(title: str, machine_name: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", f"Machine: {machine_name}.", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write(results: dict, json_path: Path, md_path: Path | None, section: str, table: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    if md_path is None:
        return
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n\nMeasured with `benchmarks/`; medians of alternating runs.\n"
    start = f"<!-- {section} -->"
    end = f"<!-- /{section} -->"
    block = f"{start}\n{table}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md_path.write_text(text)
