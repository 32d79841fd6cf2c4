"""Shortcut benchmark on biased MNIST (the paper's Table 1 protocol), on CPU.

A standard classifier and ISNet variants (Selective, Stochastic, Dual, original), each with and without
background attenuation, are trained from the same initialisation on the same biased training subset
(a bright patch in the border whose position encodes the class) and tested on three versions of the same
test images: i.i.d. (same bias), o.o.d. (no bias) and deceiving (the bias of another class).

The relevance ranges [C1, C2] follow the paper's heuristic: the standard classifier trained for the
calibration epochs is measured with each variant's own heatmap procedure (on ``--calibration-size``
training images) and ``C1 = max(M/5, M - 3S)``, ``C2 = min(25 C1, M + 3S)``.

The lean tensor loop here (no PIL decoding per step) uses the library's objective, losses and calibration
exactly as the ISNetTrainer does; only the data pipeline is simplified. Inputs are raw pixels in [0, 1]
(mean 0, std 1), so the empty background is 0.

    python benchmarks/shortcut.py                       # the README table (about an hour on 2 cores)
    python benchmarks/shortcut.py --train-size 2000 --epochs 2 --variants none selective   # quick look

Writes ``--out``/shortcut.json, shortcut.md (the table) and shortcut_heatmaps.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hf_isnet.calibration import calibrate
from hf_isnet.data import load_biased_mnist
from hf_isnet.lrp import explain
from hf_isnet.metrics import ShortcutReport, classification_metrics
from hf_isnet.modeling import create_model
from hf_isnet.variants import ISNetObjective

VERSIONS = ("iid", "ood", "deceiving")


def to_tensors(split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = np.stack([np.asarray(im, dtype=np.uint8) for im in split["image"]])
    masks = np.stack([np.asarray(m, dtype=np.uint8) for m in split["mask"]])
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    m = torch.from_numpy(masks > 0).float().unsqueeze(1)
    y = torch.tensor(split["label"], dtype=torch.long)
    return x, m, y


def batches(n: int, batch: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for i in range(0, n - batch + 1, batch):  # drop the last partial batch: BatchNorm needs > 1
        yield order[i:i + batch]


def train(model, objective: ISNetObjective, data, epochs: int, batch: int, lr: float, seed: int, log_every: int = 20):
    x, m, y = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    objective.generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    step, t0 = 0, time.time()
    history = []
    for epoch in range(epochs):
        for idx in batches(len(y), batch, g):
            out = objective(model, x[idx], m[idx], y[idx], check_inputs=False)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % log_every == 0:
                rec = {"epoch": epoch, "step": step, "loss": float(out.loss.detach()), "ce": float(out.classification_loss.detach()),
                       "heatmap_loss": None if out.heatmap_loss is None else float(out.heatmap_loss.detach()),
                       "background_fraction": None if out.background_fraction is None
                       else float(out.background_fraction), "seconds": round(time.time() - t0, 1)}
                history.append(rec)
                print("   ", rec, flush=True)
    return history


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def background_fraction(model, x: torch.Tensor, m: torch.Tensor, n: int = 500) -> float:
    """Fraction of |LRP-epsilon relevance| of the predicted class on the background (eval mode)."""
    model.eval()
    e = explain(model, x[:n], target="predicted")
    a = e.heatmap.abs().sum(1)
    return float(((a * (1 - m[:n, 0])).flatten(1).sum(1) / a.flatten(1).sum(1).clamp_min(1e-30)).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--calibration-epochs", type=int, default=None,
                   help="epochs of the standard classifier measured for [C1, C2] (default: --epochs)")
    p.add_argument("--calibration-size", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--P", type=float, default=0.7, help="heatmap_loss_weight")
    p.add_argument("--variants", nargs="+", default=["none", "selective", "stochastic", "dual", "original"])
    p.add_argument("--attenuation", choices=["off", "on", "both"], default="both")
    p.add_argument("--zb", action="store_true", help="LRP-zB on the first block (bounds [0, 1])")
    p.add_argument("--lds", action="store_true", help="LRP Deep Supervision (lds_layers='auto')")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    ds = load_biased_mnist(seed=args.seed, train_size=args.train_size, test_size=args.test_size)
    train_data = to_tensors(ds["train"])
    tests = {v: to_tensors(ds[f"test_{v}"]) for v in VERSIONS}
    print(f"data: train {len(train_data[2])}, test {len(tests['iid'][2])} x 3 ({time.time() - t_start:.0f} s)")

    torch.manual_seed(args.seed)
    init = create_model(args.arch, labels=[str(i) for i in range(10)], in_chans=1, input_size=32)
    common = dict(heatmap_loss_weight=args.P, first_layer="zb" if args.zb else None,
                  input_bounds=(0.0, 1.0) if args.zb else None, lds_layers="auto" if args.lds else None)
    report = ShortcutReport(title=f"Biased MNIST, {args.arch}, {args.train_size} training images, "
                                  f"{args.epochs} epochs")
    results: dict = {"settings": vars(args), "runs": {}, "torch": torch.__version__, "machine": platform.platform()}
    trained = {}

    # the standard classifier; its calibration-epoch state also serves the relevance-range heuristic
    cal_epochs = args.calibration_epochs or args.epochs
    std_model = copy.deepcopy(init)
    t0 = time.time()
    hist = train(std_model, ISNetObjective("none"), train_data, cal_epochs, args.batch, args.lr, args.seed)
    calib_model = copy.deepcopy(std_model)
    if args.epochs > cal_epochs:
        hist += train(std_model, ISNetObjective("none"), train_data, args.epochs - cal_epochs, args.batch, args.lr,
                      args.seed + 7)
    runs = [("none", False)] if "none" in args.variants else []
    att = {"off": [False], "on": [True], "both": [False, True]}[args.attenuation]
    runs += [(v, a) for v in args.variants if v != "none" for a in att]
    for variant, attenuate in runs:
        name = variant + (" + attenuation" if attenuate else "")
        print(f"== {name}", flush=True)
        t0 = time.time() if variant != "none" else t0
        if variant == "none":
            model, history, calibration = std_model, hist, None
        else:
            objective = ISNetObjective(variant, relevance_range=(1.0, 1.0), background_attenuation=attenuate,
                                       **common)
            cal_x = train_data[0][:args.calibration_size]
            calib_model.train()
            calibration = calibrate(lambda b, o=objective: o.calibration_maps(copy.deepcopy(calib_model), b),
                                    [cal_x[i:i + args.batch] for i in range(0, len(cal_x), args.batch)])
            objective.relevance_range = calibration
            print("   relevance ranges", calibration.ranges(), flush=True)
            model = copy.deepcopy(init)
            history = train(model, objective, train_data, args.epochs, args.batch, args.lr, args.seed)
        seconds = time.time() - t0
        run = {"train_seconds": round(seconds, 1), "history": history,
               "relevance_ranges": None if calibration is None else calibration.ranges()}
        for v in VERSIONS:
            x, m, y = tests[v]
            metrics = classification_metrics(predict(model, x), y, num_classes=10)
            frac = background_fraction(model, x, m)
            report.add(name, v, metrics, background_fraction=frac)
            run[v] = {**metrics, "background_fraction": frac}
        results["runs"][name] = run
        trained[name] = model
        print(report.to_table(), flush=True)
        (out_dir / "shortcut.json").write_text(json.dumps(results, indent=1))

    table = report.to_table(metrics=("accuracy",))
    (out_dir / "shortcut.md").write_text(table + "\n")
    print(table)
    # heatmaps of the deceiving test images: where does each model look?
    from hf_isnet.viz import plot_heatmaps

    x, m, y = tests["deceiving"]
    rows, titles = [], []
    for name, model in trained.items():
        model.eval()
        e = explain(model, x[:4], target="predicted")
        rows.append(e.heatmap)
        titles += [f"{name}: pred {int(t)}" for t in e.targets]
    plot_heatmaps(x[:4].repeat(len(rows), 1, 1, 1), torch.cat(rows), masks=m[:4].repeat(len(rows), 1, 1, 1),
                  titles=titles, path=out_dir / "shortcut_heatmaps.png", ncols=4)
    results["total_seconds"] = round(time.time() - t_start, 1)
    (out_dir / "shortcut.json").write_text(json.dumps(results, indent=1))
    print(f"total {results['total_seconds']} s")


if __name__ == "__main__":
    main()
