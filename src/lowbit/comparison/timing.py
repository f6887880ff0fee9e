"""The timing phase of a comparison: after training, a few steps of every recipe, interleaved in rounds, in
one process, so that machine load hits every recipe alike. Training-time tokens/s stays in results.json as what
it is (a throughput under whatever else the machine did); the step-time ratios of the report come from here.

    timing = measure({"bf16": cfg_a, "fp4-paper": cfg_b}, dataset, "bf16", rounds=3, steps=4)
    timing["per_recipe"]["fp4-paper"]["rel"]     # median step time / the reference's

`summarize` is the pure part (medians, ratios, spread, warnings) and is tested with a fake clock.
"""
from __future__ import annotations

import os
import statistics
import time

BUSY_SPREAD = 1.2  # rounds whose medians differ by more than 20% mean the machine's speed changed under us


def summarize(samples: dict[str, list[list[tuple[float, float]]]], reference: str | None, load_before: float,
              load_after: float, cores: int, rounds: int, steps: int, own_threads: int = 0) -> dict:
    """samples[label][round] = [(wall s, CPU s) per timed step]. Returns the timing record: per recipe the median
    wall and CPU seconds per step, the ratio to the reference's median, and the spread (slowest round median /
    fastest); plus the load averages and the warnings (machine busy, rounds disagreeing)."""
    per = {}
    for label, rs in samples.items():
        walls = [w for r in rs for w, _ in r]
        cpus = [c for r in rs for _, c in r]
        round_medians = [statistics.median(w for w, _ in r) for r in rs if r]
        per[label] = {"step_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                      "spread": max(round_medians) / min(round_medians) if min(round_medians) > 0 else None}
    ref = per.get(reference, {}).get("step_s")
    for p in per.values():
        p["rel"] = p["step_s"] / ref if ref else None
    warnings = []
    # busy: other work beyond the cores our own threads leave free (and beyond half a core of load-average noise:
    # on 2 cores lowbit's own 2 threads alone read 2.1)
    if max(load_before, load_after) - own_threads > max(0.5, cores - own_threads):
        warnings.append(f"the machine was busy (1-min load average {load_before:.2f} before, {load_after:.2f} after, "
                        f"on {cores} cores): the step times are slower than this machine's, ratios less so")
    wobbly = [lab for lab, p in per.items() if p["spread"] is not None and p["spread"] > BUSY_SPREAD]
    if wobbly:
        warnings.append(f"timing rounds disagree by more than {BUSY_SPREAD - 1:.0%} for {', '.join(wobbly)}: the "
                        "machine's speed changed during the timing phase; rerun on a quiet machine for firm ratios")
    return {"rounds": rounds, "steps": steps, "reference": reference, "load_before": load_before,
            "load_after": load_after, "cores": cores, "per_recipe": per, "warnings": warnings}


class _Probe:
    """One recipe's model, optimizer and fixed batches for timed training steps (the trainer's step without its
    bookkeeping: forward/backward per micro-batch under the recipe's autocast, the clip, AdamW)."""

    def __init__(self, cfg, dataset, device):
        import torch

        from lowbit.data import Batcher
        from lowbit.models import build_model
        from lowbit.train.runtime import apply_recipe, autocast, make_optimizer, seed_everything

        self.recipe = cfg.resolved_recipe()
        seed_everything(cfg.seed)
        self.model = apply_recipe(build_model(cfg.model, vocab_size=dataset.tokenizer.vocab_size), self.recipe)
        self.model.to(device).train()
        self.opt = make_optimizer(self.model, cfg, device)
        b = Batcher(dataset.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, device=device)
        self.batches = [b.next() for _ in range(cfg.grad_accum)]
        self.cfg, self.device, self.torch, self.autocast = cfg, device, torch, autocast

    def step(self) -> None:
        torch, cfg = self.torch, self.cfg
        for x, y in self.batches:
            with self.autocast(self.recipe, self.device):
                _, loss = self.model(x, y.contiguous())
            (loss / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(cfgs: dict, dataset, reference: str | None, device=None, rounds: int = 3, steps: int = 4,
            clock=time.perf_counter, cpu_clock=time.process_time, probe=_Probe) -> dict:
    """Time `steps` training steps of every run config in `cfgs` ({label: TrainConfig}) in each of `rounds`
    rounds, recipes interleaved within a round (each built afresh, after one untimed warm-up step). Returns `summarize`'s
    record. `clock`, `cpu_clock` and `probe(cfg, dataset, device)` (an object with `.step()`) are injectable."""
    import torch

    device = device or torch.device("cpu")
    load_before = _load()
    samples = {label: [] for label in cfgs}
    for _ in range(rounds):
        for label, cfg in cfgs.items():  # one model at a time: memory stays that of one run
            p = probe(cfg, dataset, device)
            p.step()  # warm-up: allocations, lazy initialisation
            times = []
            for _ in range(steps):
                w0, c0 = clock(), cpu_clock()
                p.step()
                times.append((clock() - w0, cpu_clock() - c0))
            samples[label].append(times)
            del p
    return summarize(samples, reference, load_before, _load(), os.cpu_count() or 1, rounds, steps,
                     own_threads=torch.get_num_threads())


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on this platform
        return 0.0
