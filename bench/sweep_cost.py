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

Each sweep's per-trial overhead (wall minus the trials' epoch seconds, over the trials) is broken into phases from
the timeline tl-ray writes with TL_RAY_TIMELINE (``phases``); ``--baseline OLD.json`` prints the ratio to a
previous run's figures (e.g. one at an earlier commit).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import tl_ray

# Where a trial's seconds go, between consecutive timeline marks (tl_ray.progress.mark). Trials run one at a time.
TUNE_START = "Tune: between trials (trial actor start)"
RUN_SETUP = "run(): data, weights, config"
RUN_END = "run() result, Tune records the trial"
PHASES = {
    ("sweep: cache ready", "driver: trial started"): TUNE_START,
    ("driver: trial complete", "driver: trial started"): TUNE_START,
    ("driver: trial started", "trial: entered"): TUNE_START,
    ("trial: entered", "run: start"): RUN_SETUP,
    ("run: start", "run: data discovered"): RUN_SETUP,
    ("run: data discovered", "run: initial weights"): RUN_SETUP,
    ("run: initial weights", "run: config written"): RUN_SETUP,
    ("run: config written", "run: splits prepared"): "run(): skip log, cache manifests",
    ("run: splits prepared", "run: fit"): "run(): loop config, weights to the object store",
    ("run: fit", "worker: loop entered"): "Ray Train start: controller, worker group, process group",
    ("worker: loop entered", "worker: model ready"): "worker: model, weights",
    ("worker: model ready", "worker: data ready"): "worker: held images",
    ("worker: data ready", "worker: epoch trained"): "epoch: train",
    ("worker: reported", "worker: epoch trained"): "epoch: train",
    ("worker: epoch trained", "worker: validated"): "epoch: validate",
    ("worker: validated", "worker: checkpoint written"): "checkpoint write",
    ("worker: checkpoint written", "worker: reported"): "report",
    ("worker: reported", "run: fit returned"): "Ray Train end: controller sees it, shuts down",
    ("run: fit returned", "run: end"): RUN_END,
    ("run: end", "trial: returned"): RUN_END,
    ("trial: returned", "driver: trial complete"): RUN_END,
}
EPOCH_PHASES = ("epoch: train", "epoch: validate")


def timeline_phases(path: Path) -> dict:
    """Seconds per phase per trial (mean over trials), the sweep's own start and end, checkpoint sizes."""
    rows = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()), key=lambda r: r["t"])
    totals: dict[str, float] = collections.defaultdict(float)
    trials = sum(row["phase"] == "driver: trial started" for row in rows)
    previous, ends = None, {}
    counted = ("sweep: cache", "driver: trial", "trial:", "run:", "worker:")
    for row in rows:
        if previous is not None and previous["phase"].startswith(counted):
            name = PHASES.get((previous["phase"], row["phase"]), f"{previous['phase']} -> {row['phase']}")
            totals[name] += row["t"] - previous["t"]
        ends.setdefault(row["phase"], row["t"])
        previous = row
    sizes = [row["bytes"] for row in rows if row["phase"] == "worker: checkpoint written"]
    per_trial = {name: seconds / max(1, trials) for name, seconds in totals.items()}
    per_trial["overhead (all but the epochs)"] = sum(v for k, v in per_trial.items() if k not in EPOCH_PHASES)
    return {
        "trials": trials,
        "per_trial_s": per_trial,
        "sweep_start_s": ends.get("sweep: cache ready", 0) - ends.get("sweep: start", 0),
        "sweep_end_s": ends.get("sweep: end", 0) - ends.get("sweep: tuner finished", 0),
        "checkpoint_bytes": sum(sizes) / max(1, len(sizes)),
    }


def run_sweep(
    target: Path, weights: str, args: argparse.Namespace, scheduler: str, storage: str, name: str, **options
) -> dict:
    timeline = Path(storage) / f"{name}-timeline.jsonl"
    timeline.parent.mkdir(parents=True, exist_ok=True)
    os.environ["TL_RAY_TIMELINE"] = str(timeline)  # Ray's processes inherit it when this process starts Ray
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
        "phases": timeline_phases(timeline) if timeline.exists() else None,
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
    parser.add_argument("--baseline", help="a previous run's JSON: print each sweep's overhead as a ratio to its")
    args = parser.parse_args(argv)

    results = {
        "benchmark": "sweep_cost",
        "command": "python bench/sweep_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
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
    for row in runs.values():
        if row["phases"]:
            phases = row["phases"]
            print(
                f"{row['scheduler']}: seconds per trial by phase ({phases['trials']} trials; checkpoints of"
                f" {phases['checkpoint_bytes'] / 1e6:.0f} MB)"
            )
            for phase, seconds in sorted(phases["per_trial_s"].items(), key=lambda item: -item[1]):
                print(f"  {seconds:6.2f}  {phase}")
            print(
                f"  once per sweep: {phases['sweep_start_s']:.1f} s Ray start + cache, {phases['sweep_end_s']:.1f}"
                " s report"
            )
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())
        results["baseline"] = {"file": args.baseline, "date": baseline.get("date"), "command": baseline.get("command")}
        for name, row in runs.items():
            if name in baseline:
                ratio = row["per_trial_overhead_s"] / baseline[name]["per_trial_overhead_s"]
                row["overhead_vs_baseline"] = ratio
                print(
                    f"{name}: per-trial overhead {row['per_trial_overhead_s']:.1f} s vs"
                    f" {baseline[name]['per_trial_overhead_s']:.1f} s in {args.baseline}: {ratio:.2f}x"
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
