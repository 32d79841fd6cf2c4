"""Seconds per training step of each ISNet variant as the number of classes grows (the paper's Fig. 5).

One training step = ``optimizer.zero_grad()`` + :class:`hf_isnet.variants.ISNetObjective` (forward, heatmaps,
losses) + ``loss.backward()`` + ``optimizer.step()``, in train mode, on a timm ResNet18 (random init) with a
fixed batch of random images and box masks. Configurations: the standard classifier (``variant="none"``)
and the original, Dual, Selective and Stochastic ISNets, each without and with LRP Deep Supervision
(``lds_layers="auto"``: layer1..layer4), for every class count in ``--classes``.

Measurement: every configuration is warmed up, then each repeat times one step of every configuration in
turn (the order rotates from repeat to repeat), so that load from other processes hits all of them alike;
the median over repeats is reported, and the ratio to the standard classifier at the same class count.
Each step is also split into phases (traced forward, heatmap backward(s), the rest of the objective,
the outer backward, the optimizer) by timing the LRP engine's entry points from outside.

The original ISNet produces its C maps ``--max-maps-per-pass`` at a time, so its cost grows with
``ceil(C / max_maps_per_pass)``. It is measured up to ``--original-max-classes``; above that it is measured
only if the predicted time (a straight line in the number of passes, fitted to the measured points) fits
in ``--original-budget-s``, otherwise the prediction is reported as an estimate (``"status": "estimated"``).
The original ISNet with more than one pass, and configurations whose predicted step exceeds
``--slow-step-s``, are timed ``--slow-repeats`` times without warm-up (one-off costs are small next to
such a step).

    python benchmarks/variants_speed.py                          # CPU, 64x64, batch 8, 2 threads
    python benchmarks/variants_speed.py --threads 1 --repeats 5  # a loaded machine: see the note below
    python benchmarks/variants_speed.py --device cuda --size 224 --batch 32

Note on threads: on a CPU shared with other busy processes, intra-op threads wait for each other and a
2-thread step can be many times slower than a 1-thread one (measured back to back on a 2-core machine with
a load average of 3-5: 2.2 s vs 0.20 s per standard step, results/variants_speed_threads{2,1}.json), and
the ratios then measure the contention, not the method. ``load_average`` is recorded; compare ratios, not
seconds, across machines.

Writes ``--out`` (JSON: settings, every time, medians, ratios, phases, the targets) and the PNG beside it
(same name, ``.png``): seconds per step vs classes, log-log, one line per variant, dashed with LDS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

from hf_isnet.lrp import _engine
from hf_isnet.variants import ISNetObjective

VARIANTS = ("none", "original", "dual", "selective", "stochastic")
# the paper's targets (method.md "Cost"): flat in C and about 3x a standard step
TARGETS = {"selective": 3.3, "stochastic": 3.3, "dual": 6.0}
FLAT_TOLERANCE = 0.10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration and class count")
    p.add_argument("--classes", type=int, nargs="+", default=[2, 10, 100, 1000])
    p.add_argument("--size", type=int, default=64, help="image side (pixels)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--lds", default="both", choices=["both", "off", "on"], help="without / with LDS")
    p.add_argument("--max-maps-per-pass", type=int, default=16, help="the original ISNet's maps per backward")
    p.add_argument("--original-max-classes", type=int, default=100,
                   help="measure the original ISNet up to this many classes; above, only if it fits the budget")
    p.add_argument("--original-budget-s", type=float, default=300.0,
                   help="largest predicted time (all its steps) to still measure the original ISNet above "
                        "--original-max-classes")
    p.add_argument("--slow-step-s", type=float, default=20.0,
                   help="configurations predicted slower than this per step: no warm-up, --slow-repeats steps")
    p.add_argument("--slow-repeats", type=int, default=1)
    p.add_argument("--profile", action="store_true",
                   help="also run torch.profiler on one step of each configuration at --profile-classes")
    p.add_argument("--profile-classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/variants_speed.json")
    p.add_argument("--plot-only", action="store_true", help="redraw the table and PNG from an existing --out")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ timing


class PhaseTimer:
    """Times the LRP engine's traced forward and heatmap backward from outside (wraps, never changes)."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.t: dict[str, float] = {}

    def _wrap(self, name: str, key: str):
        original = getattr(_engine.LRPForward, name)

        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                self.t[key] = self.t.get(key, 0.0) + dt
                if kwargs.get("rule") == "zplus":  # the Dual ISNet's second map
                    self.t[key + "_zplus"] = self.t.get(key + "_zplus", 0.0) + dt

        return original, timed

    @contextlib.contextmanager
    def installed(self):
        saved = {}
        for name, key in (("_run", "lrp_forward"), ("relevance", "heatmap_backward")):
            saved[name], timed = self._wrap(name, key)
            setattr(_engine.LRPForward, name, timed)
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(_engine.LRPForward, name, fn)


def train_step(model, opt, objective, batch, timer: PhaseTimer) -> dict[str, float]:
    """One training step; returns its total time and phases (seconds)."""
    x, masks, labels = batch
    timer.t = {}
    timer.sync()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = objective(model, x, masks, labels)
    timer.sync()
    t1 = time.perf_counter()
    out.loss.backward()
    timer.sync()
    t2 = time.perf_counter()
    opt.step()
    timer.sync()
    t3 = time.perf_counter()
    phases = {"objective": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}
    phases["lrp_forward"] = timer.t.get("lrp_forward", 0.0)
    phases["heatmap_backward"] = timer.t.get("heatmap_backward", 0.0)
    phases["heatmap_backward_zplus"] = timer.t.get("heatmap_backward_zplus", 0.0)
    # what the objective spends outside the engine: the plain forward (variant none) or the losses
    phases["losses_and_rest"] = phases["objective"] - phases["lrp_forward"] - phases["heatmap_backward"]
    phases["total"] = t3 - t0
    return phases


def passes(classes: int, chunk: int) -> int:
    return math.ceil(classes / chunk)


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares ``t = a + b * n`` (at least two distinct n), else None."""
    ns = {n for n, _ in points}
    if len(ns) < 2:
        if len(points) >= 1:  # one pass count only: proportional through the origin
            n0 = statistics.median(n for n, _ in points)
            t0 = statistics.median(t for _, t in points)
            return 0.0, t0 / n0
        return None
    mn = sum(n for n, _ in points) / len(points)
    mt = sum(t for _, t in points) / len(points)
    b = sum((n - mn) * (t - mt) for n, t in points) / sum((n - mn) ** 2 for n, _ in points)
    return mt - b * mn, b


# ----------------------------------------------------------------------------------------- the run


def make_batch(args, classes: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    masks = torch.zeros(args.batch, 1, args.size, args.size)
    q = args.size // 4
    masks[:, :, q:3 * q, q:3 * q] = 1
    labels = torch.randint(0, classes, (args.batch,), generator=g)
    return x.to(device), masks.to(device), labels.to(device)


def make_model(args, classes: int, device) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(args.seed)
        model = timm.create_model("resnet18", pretrained=False, num_classes=classes)
    return model.to(device).train()


def configs(args) -> list[tuple[str, bool]]:
    out = []
    for v in args.variants:
        lds_options = [False] if v == "none" else {"both": [False, True], "off": [False], "on": [True]}[args.lds]
        out += [(v, lds) for lds in lds_options]
    return out


def objective_for(variant: str, lds: bool, args) -> ISNetObjective:
    return ISNetObjective(
        variant, 0.7, None if variant == "none" else (1.0, 10.0), lds_layers="auto" if lds else None,
        max_maps_per_pass=args.max_maps_per_pass,
    )


def label(variant: str, lds: bool) -> str:
    return variant + ("+LDS" if lds else "")


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timer = PhaseTimer(sync)
    cfgs = configs(args)
    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    setups = {}  # classes -> (model, optimizer, batch): one model per class count, all alive
    for classes in sorted(args.classes):
        model = make_model(args, classes, device)
        setups[classes] = (model, torch.optim.SGD(model.parameters(), lr=1e-4), make_batch(args, classes, device))

    def entry_for(variant, lds, classes, predicted=None):
        slow = predicted is not None and predicted > args.slow_step_s
        e = {"variant": variant, "lds": lds, "classes": classes, "label": label(variant, lds), "status": "measured",
             "times_s": [], "phases": [], "repeats": args.slow_repeats if slow else args.repeats,
             "warmup": 0 if slow else args.warmup}
        if predicted is not None:
            e["predicted_s"] = predicted
        return e

    def measure(plan: dict) -> None:
        """Warm up, then time every entry once per repeat, in an order that rotates between repeats."""
        for key, (obj, entry) in plan.items():
            model, opt, batch = setups[key[2]]
            for _ in range(entry["warmup"]):
                train_step(model, opt, obj, batch, timer)
        keys = list(plan)
        for r in range(max((e["repeats"] for _, e in plan.values()), default=0)):
            shift = (r * max(1, len(keys) // max(1, args.repeats))) % max(1, len(keys))
            for key in keys[shift:] + keys[:shift]:
                obj, entry = plan[key]
                if r >= entry["repeats"]:
                    continue
                model, opt, batch = setups[key[2]]
                ph = train_step(model, opt, obj, batch, timer)
                entry["times_s"].append(ph["total"])
                entry["phases"].append(ph)
                print(f"  C={key[2]:<5d} {entry['label']:<16s} repeat {r}: {ph['total']:.3f} s "
                      f"({time.time() - started:.0f} s)", flush=True)
        for _obj, entry in plan.values():
            entry["median_s"] = statistics.median(entry["times_s"])
            entry["min_s"] = min(entry["times_s"])
            entry["phases_median_s"] = {k: statistics.median(p[k] for p in entry["phases"]) for k in entry["phases"][0]}
            del entry["phases"]

    results: list[dict] = []
    with timer.installed():
        # stage 1: everything, interleaved over class counts and configurations, except the original
        # ISNet above --original-max-classes
        plan = {}
        for classes in sorted(args.classes):
            for variant, lds in cfgs:
                if variant == "original" and classes > args.original_max_classes:
                    continue
                entry = entry_for(variant, lds, classes)
                if variant == "original" and passes(classes, args.max_maps_per_pass) > 1:
                    entry.update(repeats=args.slow_repeats, warmup=0)  # several passes: a slow step
                plan[(variant, lds, classes)] = (objective_for(variant, lds, args), entry)
        measure(plan)
        results += [e for _, e in plan.values()]
        # stage 2: the original ISNet at more classes, measured if the fitted prediction fits the budget
        for classes in sorted(c for c in args.classes if c > args.original_max_classes):
            for variant, lds in cfgs:
                if variant != "original":
                    continue
                points = [(passes(e["classes"], args.max_maps_per_pass), e["median_s"]) for e in results
                          if e["variant"] == "original" and e["lds"] == lds and e["status"] == "measured"]
                line = fit_line(points)
                predicted = None if line is None else line[0] + line[1] * passes(classes, args.max_maps_per_pass)
                entry = entry_for(variant, lds, classes, predicted)
                n_steps = entry["repeats"] + entry["warmup"]
                if predicted is None or predicted * n_steps > args.original_budget_s:
                    entry.update(status="estimated", median_s=predicted, times_s=[], repeats=0, warmup=0)
                    del entry["phases"]
                    entry["note"] = (
                        f"not measured: predicted {predicted:.1f} s/step x {n_steps} steps > --original-budget-s "
                        f"{args.original_budget_s:.0f} s; the value is the straight-line fit in the number of passes "
                        f"(ceil(C / {args.max_maps_per_pass})) through the measured points"
                        if predicted is not None else "not measured: no measured point to predict from")
                    if line is not None:
                        entry["fit_s"] = {"intercept": line[0], "per_pass": line[1]}
                    results.append(entry)
                    continue
                measure({(variant, lds, classes): (objective_for(variant, lds, args), entry)})
                results.append(entry)
    results.sort(key=lambda e: (e["classes"], VARIANTS.index(e["variant"]), e["lds"]))
    setups.clear()

    standard = {e["classes"]: e for e in results if e["variant"] == "none"}
    for e in results:
        std = standard.get(e["classes"])
        if e.get("median_s") is None or std is None:
            continue
        e["ratio_to_standard"] = e["median_s"] / std["median_s"]
        # paired: each step over the standard step of the same class count in the same repeat (the
        # two ran seconds apart, so slow drifts of the machine's load cancel)
        pairs = [t / t0 for t, t0 in zip(e["times_s"], std["times_s"])]
        if pairs:
            e["paired_ratio_median"] = statistics.median(pairs)

    report = {
        "benchmark": "seconds per training step vs number of classes (Faster ISNet paper, Fig. 5)",
        "settings": {
            "model": "timm resnet18 (random init), train mode", "image_size": args.size, "batch": args.batch,
            "device": str(device), "threads": args.threads if device.type == "cpu" else None,
            "repeats": args.repeats, "warmup": args.warmup, "classes": sorted(args.classes),
            "max_maps_per_pass": args.max_maps_per_pass, "original_max_classes": args.original_max_classes,
            "original_budget_s": args.original_budget_s, "slow_step_s": args.slow_step_s,
            "slow_repeats": args.slow_repeats, "optimizer": "SGD lr 1e-4", "heatmap_loss_weight": 0.7,
            "relevance_range": [1.0, 10.0], "lds_layers": "auto (layer1..layer4)",
            "step": "zero_grad + ISNetObjective (forward, heatmaps, losses) + backward + SGD step",
        },
        "environment": {
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "wall_time_s": time.time() - started,
        "results": results,
    }
    report["targets"] = check_targets(results)
    if args.profile:
        report["profile"] = profile(args, device)
    return report


def check_targets(results: list[dict]) -> dict:
    """Ratio targets (no LDS) at every class count, and flatness (largest C vs 10 classes).

    Ratios are the paired ones (median over repeats of step / standard step of the same repeat);
    flatness is the median over repeats of t(C_max) / t(10) of the same repeat, both as measured and
    normalised by the standard classifier's own change (its classifier head grows with C too).
    """
    out = {}
    by = {(e["variant"], e["lds"], e["classes"]): e for e in results if e.get("median_s") is not None}
    for variant, limit in TARGETS.items():
        ratios = {c: e.get("paired_ratio_median", e.get("ratio_to_standard")) for (v, lds, c), e in by.items()
                  if v == variant and not lds and "ratio_to_standard" in e}
        if not ratios:
            continue
        entry = {"max_ratio": limit, "ratios": ratios, "ratio_ok": all(r <= limit for r in ratios.values())}
        cs = sorted(c for (v, lds, c) in by if v == variant and not lds)
        if 10 in cs and cs[-1] > 10:
            a, b = by[(variant, False, 10)], by[(variant, False, cs[-1])]
            paired = statistics.median(t1 / t0 for t0, t1 in zip(a["times_s"], b["times_s"]))
            norm = None
            if "paired_ratio_median" in a and "paired_ratio_median" in b:
                norm = b["paired_ratio_median"] / a["paired_ratio_median"]
            entry["flat"] = {"classes": [10, cs[-1]], "time_ratio": paired, "ratio_of_medians": b["median_s"] / a["median_s"],
                             "time_ratio_normalised_by_standard": norm, "ok": abs(paired - 1) <= FLAT_TOLERANCE}
        out[variant] = entry
    return out


def profile(args, device) -> dict:
    """torch.profiler on one step per configuration: the operators with the most self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    classes = args.profile_classes
    model = make_model(args, classes, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    batch = make_batch(args, classes, device)
    timer = PhaseTimer(lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for variant, lds in configs(args):
        if variant == "original" and classes > 16 * args.max_maps_per_pass:
            continue
        obj = objective_for(variant, lds, args)
        train_step(model, opt, obj, batch, timer)
        with torch_profile(activities=acts) as prof:
            train_step(model, opt, obj, batch, timer)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:15]
        out[label(variant, lds)] = [
            {"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count} for e in rows]
    return {"classes": classes, "top_ops": out}


# ---------------------------------------------------------------------------------------- output


def table(report: dict) -> str:
    results = report["results"]
    classes = report["settings"]["classes"]
    labels = list(dict.fromkeys(e["label"] for e in results))
    by = {(e["label"], e["classes"]): e for e in results}
    head = f"{'configuration':<17s}" + "".join(f"{f'C={c}':>22s}" for c in classes)
    lines = ["median seconds per step (paired ratio to the standard classifier at the same C: median over repeats "
             "of step / standard step of the same repeat); * = estimated", head,
             "-" * len(head)]
    for lab in labels:
        cells = []
        for c in classes:
            e = by.get((lab, c))
            if e is None or e.get("median_s") is None:
                cells.append(f"{'-':>22s}")
                continue
            star = "*" if e["status"] == "estimated" else " "
            r = e.get("paired_ratio_median", e.get("ratio_to_standard"))
            ratio = f"({r:.2f}x)" if r is not None else ""
            cells.append(f"{e['median_s']:>11.3f}{star} {ratio:>9s}")
        lines.append(f"{lab:<17s}" + "".join(cells))
    lines.append("")
    for v, t in report["targets"].items():
        rs = ", ".join(f"C={c}: {r:.2f}x" for c, r in t["ratios"].items())
        lines.append(f"target {v} <= {t['max_ratio']}x standard: {'PASS' if t['ratio_ok'] else 'MISS'} ({rs})")
        if "flat" in t:
            f = t["flat"]
            norm = f", normalised by the standard's {f['time_ratio_normalised_by_standard']:.3f}" \
                if f["time_ratio_normalised_by_standard"] is not None else ""
            lines.append(f"target {v} flat in C (C={f['classes'][1]} vs C=10 within {FLAT_TOLERANCE:.0%}): "
                         f"{'PASS' if f['ok'] else 'MISS'} (paired {f['time_ratio']:.3f}, medians "
                         f"{f['ratio_of_medians']:.3f}{norm})")
    for e in results:
        if e["status"] == "estimated":
            lines.append(f"{e['label']} at C={e['classes']}: {e['note']}")
    return "\n".join(lines)


def phase_table(report: dict) -> str:
    keys = ["lrp_forward", "heatmap_backward", "heatmap_backward_zplus", "losses_and_rest", "backward", "optimizer",
            "total"]
    lines = ["median phases (s): lrp_forward = traced forward (incl. z+ shadow), heatmap_backward = "
             "autograd.grad of the maps (_zplus: the Dual's z+ map alone), losses_and_rest = objective minus both (the forward for 'none'), "
             "backward = outer loss.backward()",
             f"{'configuration':<17s}{'C':>6s}" + "".join(f"{k:>23s}" for k in keys)]
    for e in report["results"]:
        if "phases_median_s" in e:
            p = e["phases_median_s"]
            lines.append(f"{e['label']:<17s}{e['classes']:>6d}" + "".join(f"{p[k]:>23.3f}" for k in keys))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "black", "original": "tab:red", "dual": "tab:purple", "selective": "tab:blue",
              "stochastic": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 5))
    results = report["results"]
    for variant in VARIANTS:
        for lds in (False, True):
            pts = sorted((e["classes"], e["median_s"], e["status"]) for e in results
                         if e["variant"] == variant and e["lds"] == lds and e.get("median_s") is not None)
            if not pts:
                continue
            style = "--" if lds else "-"
            measured = [(c, t) for c, t, s in pts if s == "measured"]
            if measured:
                ax.plot(*zip(*measured), style, marker="o", color=colors[variant], label=label(variant, lds))
            est = [(c, t) for c, t, s in pts if s == "estimated"]
            if est:
                last = measured[-1:] if measured else []
                ax.plot(*zip(*(last + est)), ":", color=colors[variant])
                ax.plot(*zip(*est), linestyle="none", marker="o", markerfacecolor="white", color=colors[variant],
                        label=f"{label(variant, lds)} (estimated)")
    s = report["settings"]
    where = s["device"] + (f", {s['threads']} thread{'s' if s['threads'] > 1 else ''}" if s["threads"] else "")
    ax.set(xscale="log", yscale="log", xlabel="number of classes", ylabel="seconds per training step",
           title=f"ResNet18, {s['image_size']}x{s['image_size']}, batch {s['batch']}, {where}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        report = json.loads(out.read_text())
        print(table(report))
        plot(report, out.with_suffix(".png"))
        return
    report = run(args)
    print()
    print(table(report))
    print()
    print(phase_table(report))
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
