"""How much a heatmap and an ISNet training step cost, relative to plain training (method.md, "Cost").

On CPU, timm ResNet18 (10 classes), measured side by side in one run (the machines are shared and
noisy): every repetition runs both sides of each ratio back to back, and the headline ratio is the
median over repetitions of the within-repetition ratio.

    (a) heatmap       explain(target="predicted")            vs  plain forward + CE backward
    (b) ISNet step    explain(create_graph=True) + CE +       vs  plain step: forward, CE, backward,
                      heatmap_loss, backward, SGD step            SGD step

both in train mode (BatchNorm batch statistics: how the ISNet trains, the main number) and eval mode.
The target for (b) is <= 3.3x (the paper counts ~3x in matrix products; a minimal LRP-Flex measured 3.1x).

    python benchmarks/lrp_speed.py --repeats 15 --batch 8 --size 64 --threads 2 --out benchmarks/results

writes ``lrp_speed.json`` (times, ratios, versions, machine) and ``lrp_speed.png`` (the paired ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from hf_isnet.losses import heatmap_loss
from hf_isnet.lrp import explain

TARGET_RATIO = 3.3
NOISY = 1.5  # a median this many times the fastest run means other load interfered
P = 0.7  # heatmap loss weight (paper default)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_variants(mode: str, batch: int, size: int, classes: int, seed: int) -> dict[str, Callable[[], None]]:
    """Closures that each run one measured unit of work on their own copy of the model."""
    torch.manual_seed(seed)
    base = timm.create_model("resnet18", pretrained=False, num_classes=classes)
    base.train(mode == "train")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    masks = torch.zeros(batch, 1, size, size)
    for i in range(batch):  # a random foreground rectangle per image
        h0, w0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        masks[i, :, h0:h0 + size // 2, w0:w0 + size // 2] = 1

    models = {k: copy.deepcopy(base) for k in ("forward_backward", "heatmap", "plain_step", "isnet_step")}
    opts = {k: torch.optim.SGD(models[k].parameters(), lr=1e-4, momentum=0.9) for k in ("plain_step", "isnet_step")}
    stoch = torch.Generator().manual_seed(seed + 1)

    def forward_backward() -> None:
        m = models["forward_backward"]
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()

    def heatmap() -> None:
        explain(models["heatmap"], x, "predicted")

    def plain_step() -> None:
        m, opt = models["plain_step"], opts["plain_step"]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()

    def isnet_step() -> None:
        m, opt = models["isnet_step"], opts["isnet_step"]
        opt.zero_grad(set_to_none=True)
        e = explain(m, x, "stochastic", create_graph=True, generator=stoch)  # one map per image
        lrp = heatmap_loss(e.heatmap[:, None], masks, 1.0, 25.0).total
        ((1 - P) * F.cross_entropy(e.logits, y) + P * lrp).backward()
        opt.step()

    return {"forward_backward": forward_backward, "heatmap": heatmap, "plain_step": plain_step,
            "isnet_step": isnet_step}


RATIOS = {  # name -> (numerator, denominator)
    "heatmap / forward+backward": ("heatmap", "forward_backward"),
    "ISNet step / plain step": ("isnet_step", "plain_step"),
}


def measure(variants: dict[str, Callable[[], None]], repeats: int, warmup: int,
            label: str = "") -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each variant, ``repeats`` times.

    The two sides of each ratio run back to back (in alternating order), so a change of the machine's
    load between repetitions hits both sides of a pair alike.
    """
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(repeats):
        for pair in RATIOS.values():
            for n in pair if r % 2 == 0 else pair[::-1]:
                w0, c0 = time.perf_counter(), time.process_time()
                variants[n]()
                times["wall"][n].append(time.perf_counter() - w0)
                times["cpu"][n].append(time.process_time() - c0)
        wall = times["wall"]
        print(f"{label} repetition {r + 1}/{repeats}: " + ", ".join(
            f"{num}/{den} {wall[num][-1] / wall[den][-1]:.2f}x" for num, den in RATIOS.values()),
            file=sys.stderr, flush=True)
    return times


def summarize(times: dict[str, dict[str, list[float]]]) -> dict:
    """Per clock: medians, minimums and three estimates of each ratio.

    ``paired`` (the median over repetitions of the ratio within a repetition) is the headline: it is
    the least sensitive to load that changes during the run. ``of_minimums`` compares the least
    disturbed runs; ``cpu`` (process CPU time) counts waiting for a core less than ``wall``.
    """
    out = {}
    for clock, t in times.items():
        med = {n: statistics.median(v) for n, v in t.items()}
        low = {n: min(v) for n, v in t.items()}
        ratios = {}
        for label, (num, den) in RATIOS.items():
            ratios[label] = {"paired": statistics.median(a / b for a, b in zip(t[num], t[den])),
                             "of_medians": med[num] / med[den], "of_minimums": low[num] / low[den]}
        out[clock] = {"median_s": med, "min_s": low, "all_s": t, "ratios": ratios}
    return out


def plot(results: dict, path: Path) -> None:
    fig = Figure(figsize=(6.5, 3.6), dpi=120)
    ax = fig.subplots()
    labels, values, colours = [], [], []
    for mode, res in results["modes"].items():
        for label, r in res["wall"]["ratios"].items():
            labels.append(f"{label}\n({mode} mode)")
            values.append(r["paired"])
            colours.append("tab:red" if mode == "train" else "tab:blue")
    bars = ax.bar(range(len(values)), values, color=colours)
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(TARGET_RATIO, color="black", linestyle="--", linewidth=1)
    ax.text(len(values) - 0.5, TARGET_RATIO, f"target {TARGET_RATIO}x", ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylim(0, 1.15 * max(values + [TARGET_RATIO]))
    ax.set_ylabel("time ratio (median of paired runs)", fontsize=8)
    a = results["args"]
    ax.set_title(f"LRP-Flex cost, timm ResNet18, batch {a['batch']}, {a['size']}x{a['size']}, "
                 f"{a['threads']} CPU threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "target_ratio_isnet_step": TARGET_RATIO,
        "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
        "machine": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_avg_before": list(os.getloadavg())},
        "modes": {},
    }
    for mode in args.modes:
        variants = make_variants(mode, args.batch, args.size, args.classes, args.seed)
        results["modes"][mode] = summarize(measure(variants, args.repeats, args.warmup, label=mode))
    results["machine"]["load_avg_after"] = list(os.getloadavg())

    print(f"timm ResNet18, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats}")
    print(f"{'mode':6} {'variant':18} {'wall ms (median, min)':>22} {'cpu ms (median)':>16}")
    for mode, res in results["modes"].items():
        w, c = res["wall"], res["cpu"]
        for n in w["median_s"]:
            print(f"{mode:6} {n:18} {1e3 * w['median_s'][n]:11.1f} {1e3 * w['min_s'][n]:9.1f} "
                  f"{1e3 * c['median_s'][n]:16.1f}")
    print(f"\n{'mode':6} {'ratio':28} {'paired':>8} {'medians':>8} {'minimums':>9} {'cpu paired':>11}")
    for mode, res in results["modes"].items():
        for label, r in res["wall"]["ratios"].items():
            c = res["cpu"]["ratios"][label]["paired"]
            print(f"{mode:6} {label:28} {r['paired']:7.2f}x {r['of_medians']:7.2f}x {r['of_minimums']:8.2f}x "
                  f"{c:10.2f}x")
    spread = max(w["median_s"][n] / w["min_s"][n] for res in results["modes"].values() for w in [res["wall"]]
                 for n in w["median_s"])
    results["max_median_over_min"] = spread
    if spread > NOISY:
        print(f"WARNING: a variant's median is {spread:.1f}x its fastest run: the machine was busy (other "
              "processes competing for the cores); the ratios are unreliable, rerun on a quiet machine")
    print(f"target for the ISNet step: <= {TARGET_RATIO}x; load average during the run: "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lrp_speed.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "lrp_speed.png")
    print(f"wrote {args.out / 'lrp_speed.json'} and {args.out / 'lrp_speed.png'}")
    return results


if __name__ == "__main__":
    main()
