"""Where a simulated training step's time goes: torch.profiler and cProfile over real `lowbit.train` steps.

    python bench/gpu_profile.py --model gpt2-small --recipes bf16,fp8-tensor --device cuda
    python bench/gpu_profile.py --model tiny --recipes fp8-tensor --steps 2       # a CPU smoke run

For each recipe one `lowbit.train.train` run: `--skip` steps (warm-up: Triton compilation, allocator), then
`--steps` profiled steps, then one more (the run's last step samples the quantization statistics; it is
not profiled). Printed per recipe: wall ms/step, device kernel ms/step (GPU busy time; far below
wall time means the step is host-bound), kernel launches and host-device synchronisations per step, the
kernels taking the most device time and the host ops taking the most self CPU time. With `--cprofile R`,
recipe R runs once more under cProfile: the Python functions taking the most host time, for finding which
part of lowbit's layer code a host-bound step spends itself in. Markdown on stdout; no timed assertions.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import corpus_file  # bench/ is on sys.path when a script here runs
from torch.profiler import ProfilerActivity, profile, schedule

from lowbit.data import prepare_dataset
from lowbit.models import get_config
from lowbit.train import TrainConfig, resolve_device, train
from lowbit.train.trainer import Trainer

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _device_us(e) -> float:
    return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)


class StepHook(Trainer):
    """A Trainer that calls `hook()` after each optimizer step (GPU work synchronised first): bench/gpu_profile.py
    advances its profiler from it, bench/cpu_profile.py starts and stops perf."""
    hook = None

    def train_step(self, stop=None):
        out = super().train_step(stop)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        type(self).hook()
        return out


def _config(model, recipe, steps, device, out, compile_mode: str = "") -> TrainConfig:
    B, T = {"tiny": (8, 128), "small": (2, 256)}.get(model, (8, get_config(model).block_size))
    return TrainConfig(model=model, recipe=recipe, tokens=steps * B * T, batch_size=B, seq_len=T, device=device,
                       eval_interval=10**9, log_interval=10**9, ckpt_interval=10**9, keep_last=1, seed=0,
                       out=str(out), overwrite=True, compile=bool(compile_mode),
                       compile_mode=compile_mode or "default")


def profile_recipe(model, recipe, skip, steps, device, workdir: Path, ds, top: int, compile_mode: str = "") -> str:
    """One markdown section: per-step wall/device time, launches, syncs, top kernels and host ops."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    marks = []
    with profile(activities=acts, schedule=schedule(wait=skip, warmup=1, active=steps, repeat=1)) as prof:
        StepHook.hook = lambda: (marks.append(time.perf_counter()), prof.step())
        train(_config(model, recipe, skip + 2 + steps, str(device), workdir / recipe, compile_mode), progress=False,
              dataset=ds, trainer=StepHook)
    wall_ms = (marks[skip + steps] - marks[skip]) / steps * 1e3
    ev = prof.key_averages()
    per = lambda names: sum(e.count for e in ev if e.key in names) / steps
    # device-side copies of host annotations (ProfilerStep*, Optimizer.step#...) share a host event's name
    host_names = {e.key for e in ev if e.device_type.name == "CPU"}
    kernels = sorted((e for e in ev if _device_us(e) > 0 and e.device_type.name == "CUDA"
                      and e.key not in host_names), key=_device_us, reverse=True)
    busy_ms = sum(_device_us(e) for e in kernels) / steps / 1e3
    lines = [f"### {model} · {recipe}{f' (compiled, {compile_mode})' if compile_mode else ''}", "",
             (f"wall {wall_ms:.1f} ms/step · device kernels {busy_ms:.1f} ms/step "
             f"({busy_ms / wall_ms:.0%} busy) · launches {per(LAUNCHES):.0f}/step · syncs {per(SYNCS):.1f}/step · "
             f"aten ops {sum(e.count for e in ev if e.key.startswith('aten::')) / steps:.0f}/step"), ""]
    if kernels:
        lines += ["| kernel | ms/step | calls/step |", "|---|---:|---:|"]
        lines += [f"| {e.key[:90]} | {_device_us(e) / steps / 1e3:.2f} | {e.count / steps:.0f} |"
                  for e in kernels[:top]]
        lines.append("")
    host = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines += ["| host op | self CPU ms/step | calls/step |", "|---|---:|---:|"]
    lines += [f"| {e.key[:90]} | {e.self_cpu_time_total / steps / 1e3:.2f} | {e.count / steps:.0f} |"
              for e in host]
    return "\n".join(lines + [""])


def cprofile_recipe(model, recipe, skip, steps, device, workdir: Path, ds, top: int) -> str:
    """The Python functions with the most host time over `steps` steps after `skip` warm-up steps."""
    prof, seen = cProfile.Profile(), []

    def hook():
        seen.append(1)
        if len(seen) == skip:
            prof.enable()
        elif len(seen) == skip + steps:
            prof.disable()
    StepHook.hook = hook
    train(_config(model, recipe, skip + steps + 1, str(device), workdir / f"{recipe}-cprofile"), progress=False,
          dataset=ds, trainer=StepHook)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    body = buf.getvalue()
    body = body[body.find("ncalls"):] if "ncalls" in body else body
    return f"### cProfile {model} · {recipe} ({steps} steps, sorted by own time)\n\n```\n{body.rstrip()}\n```\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--recipes", default="bf16,fp8-tensor", help="comma-separated recipes")
    p.add_argument("--skip", type=int, default=3, help="warm-up steps before profiling (default: 3)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default: 3)")
    p.add_argument("--top", type=int, default=12, help="rows per table (default: 12)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cprofile", default="", help="a recipe to run once more under cProfile")
    p.add_argument("--compile-mode", default="", help="profile compiled steps (default, reduce-overhead, ...); "
                                                       "--skip must then cover the compilation")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"## Profile: {' '.join(sys.argv)}\n\n{where}, torch {torch.__version__}\n")
    with tempfile.TemporaryDirectory() as d:
        ds = prepare_dataset(str(corpus_file(Path(d))), tokenizer="bpe", vocab_size=2048, progress=False)
        for r in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            print(profile_recipe(args.model, r, args.skip, args.steps, device, Path(d), ds, args.top,
                                 args.compile_mode), flush=True)
        if args.cprofile:
            print(cprofile_recipe(args.model, args.cprofile, args.skip, args.steps, device, Path(d), ds,
                                  3 * args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
