"""Sweep-cost benchmark: a freeze-depth sweep with ASHA vs FIFO, in trial-epochs and wall time.

The transfer story of `make demo`: a ResNet-18 learns the sample source shapes from
scratch, then `tl-ray tune` compares freeze depths for transferring it to the target
shapes, once with ASHA (weak trials stopped at rungs of 1, 2, 4... epochs) and once
with FIFO (every trial runs every epoch), with the same seeded learning rates. It
reports each scheduler's total trial-epochs, wall time, and best freeze depth. With
``--feature-cache`` it also times depth-5 trials on centre crops (``--augment none``)
with the frozen-backbone feature cache against the same trials decoding every epoch.

    python bench/sweep_cost.py                       # ~15 min on 2 CPUs
    python bench/sweep_cost.py --feature-cache       # + depth-5 trials with and without the feature cache
    python bench/sweep_cost.py --per-class 6 --source-epochs 0 --depths 5 --max-epochs 1 --schedulers asha  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import tl_ray


def run_sweep(
    target: Path, weights: str, args: argparse.Namespace, scheduler: str, storage: str, name: str, **options
) -> dict:
    started = time.perf_counter()
    summary, _ = tl_ray.tune(
        data=str(target),
        arch="resnet18",
        weights=weights,
        image_size=args.image_size,
        batch_size=args.batch_size,
        freeze_depths=options.pop("freeze_depths", args.depths),
        lr_min=args.lr_min,
        lr_max=args.lr_max,
        max_epochs=args.max_epochs,
        scheduler=scheduler,
        storage=storage,
        name=name,
        seed=args.seed,
        **options,
    )
    best = summary.best
    wall = time.perf_counter() - started
    trial_seconds = sum(trial.seconds for trial in summary.trials)
    return {
        "scheduler": scheduler,
        "wall_s": wall,
        "trial_seconds": trial_seconds,
        # Trials run one at a time on CPU: what a sweep costs beyond its epochs, per trial (start-up, checkpoints).
        "per_trial_overhead_s": (wall - trial_seconds) / max(1, len(summary.trials)),
        "trial_epochs": sum(trial.epochs for trial in summary.trials),
        "best_freeze_depth": best.freeze_depth if best else None,
        "best_val_acc": best.val_acc if best else None,
        "trials": [
            {"freeze_depth": t.freeze_depth, "lr": t.lr, "epochs": t.epochs, "val_acc": t.val_acc, "status": t.status}
            for t in sorted(summary.trials, key=lambda t: t.freeze_depth)
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=120, help="sample images per class (source and target)")
    parser.add_argument("--source-epochs", type=int, default=4, help="0: no source model, sweep from random weights")
    parser.add_argument("--depths", default="0,1,2,3,4,5")
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-min", type=float, default=3e-4)
    parser.add_argument("--lr-max", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedulers", default="fifo,asha", help="the sweeps to run (both to compare them)")
    parser.add_argument(
        "--feature-cache", action="store_true", help="also time depth-5 --augment none trials with and without it"
    )
    parser.add_argument("--feature-trials", type=int, default=3, help="depth-5 trials per --feature-cache sweep")
    parser.add_argument("--out", default="bench/results/sweep_cost.json")
    args = parser.parse_args(argv)

    results = {
        "benchmark": "sweep_cost",
        "command": "python bench/sweep_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
    }
    with tempfile.TemporaryDirectory() as workdir:
        tl_ray.write_sample_data(f"{workdir}/data", per_class=args.per_class, seed=args.seed)
        weights = "none"  # --source-epochs 0: sweep from random weights (a smoke test of the machinery only)
        if args.source_epochs > 0:
            started = time.perf_counter()
            source = tl_ray.train(
                data=f"{workdir}/data/source",
                arch="resnet18",
                weights="none",
                image_size=args.image_size,
                batch_size=args.batch_size,
                epochs=args.source_epochs,
                storage=f"{workdir}/runs",
                name="source",
                seed=args.seed,
            )
            results["source"] = {"val_acc": source.metrics["val_acc"], "wall_s": time.perf_counter() - started}
            weights = source.best_checkpoint
        target = Path(workdir) / "data" / "target"
        # Both sweeps share one decoded-image cache (the default, under their storage): neither pays for decoding
        # more than the other. FIFO first, so ASHA is not the one that builds it.
        schedulers = args.schedulers.split(",")
        runs = {name: run_sweep(target, weights, args, name, f"{workdir}/runs", name) for name in schedulers}
        if args.feature_cache:
            # Depth-5 trials on centre crops (--augment none): backbone features computed once and shared, vs
            # decoding and running the backbone every epoch of every trial (--cache none).
            depth5 = {"freeze_depths": "5", "augment": "none", "num_samples": args.feature_trials}
            results["feature_cache"] = {
                "cached": run_sweep(target, weights, args, "fifo", f"{workdir}/runs", "features", **depth5),
                "uncached": run_sweep(
                    target, weights, args, "fifo", f"{workdir}/runs", "no-cache", cache="none", **depth5
                ),
            }
    results.update(runs)
    print(f"sweep cost: depths {args.depths}, {args.max_epochs} epochs max, {results['machine']}")
    if "source" in results:
        print(f"source model val_acc {results['source']['val_acc']:.3f}")
    print(
        f"{'scheduler':>9} {'trial-epochs':>13} {'wall s':>8} {'overhead s/trial':>17} {'best depth':>11}"
        f" {'best val_acc':>13}"
    )
    for row in runs.values():
        print(
            f"{row['scheduler']:>9} {row['trial_epochs']:>13} {row['wall_s']:>8.0f}"
            f" {row['per_trial_overhead_s']:>17.1f} {row['best_freeze_depth']!s:>11}"
            f" {row['best_val_acc'] or float('nan'):>13.3f}"
        )
    if {"fifo", "asha"} <= set(runs):
        fifo, asha = runs["fifo"], runs["asha"]
        results["trial_epoch_ratio"] = asha["trial_epochs"] / fifo["trial_epochs"]
        results["wall_ratio"] = asha["wall_s"] / fifo["wall_s"]
        results["same_best_depth"] = asha["best_freeze_depth"] == fifo["best_freeze_depth"]
        print(
            f"ASHA / FIFO: {results['trial_epoch_ratio']:.2f} of the trial-epochs, {results['wall_ratio']:.2f} of"
            f" the wall time; same best depth: {results['same_best_depth']}"
        )
    if args.feature_cache:
        cached, uncached = results["feature_cache"]["cached"], results["feature_cache"]["uncached"]
        results["feature_cache"]["trial_seconds_ratio"] = cached["trial_seconds"] / uncached["trial_seconds"]
        results["feature_cache"]["wall_ratio"] = cached["wall_s"] / uncached["wall_s"]
        print(f"depth-5 trials (--augment none, {args.feature_trials} trials, {args.max_epochs} epochs each):")
        print(f"{'':22} {'trial s':>9} {'wall s':>8}")
        for label, row in (("feature cache", cached), ("--cache none", uncached)):
            print(f"{label:22} {row['trial_seconds']:>9.1f} {row['wall_s']:>8.0f}")
        print(
            f"feature cache / uncached: {results['feature_cache']['trial_seconds_ratio']:.3f} of the trial seconds,"
            f" {results['feature_cache']['wall_ratio']:.2f} of the wall time"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
