"""The fine-tuning toolbox, measured (issue 41): each option alone against tl-ray's defaults, and the best
combination, on real datasets at two sizes, from scratch and from a related checkpoint at depth 3.

A row is (dataset, training images a class, start); a column is a variant: ``VARIANTS`` maps its name to the
``tl_ray.train`` keywords it adds to the defaults (data, resnet18, weights, depth, epochs, 32 px and the seed are
the regime's, as in ``bench/regimes.py``, whose datasets, sizes, epochs and source checkpoints this reuses).
Options another change adds to ``TrainConfig`` (EMA, MixUp, CutMix, layer decay, accumulation) are in the list
already and run once the field exists. ``tta-flip`` is not a training option: it is the defaults' best
checkpoint evaluated on the validation set with ``--tta flip``. "best" trains the union of the options whose
mean gain on that row was positive (the better of two augmentation policies), on the same seeds.

Each (row, variant) runs on ``--seeds`` seeds; the table gives the mean and sd of the best epoch's val_acc, and
the difference from the defaults with its standard error (sd of the paired differences / sqrt(seeds)): a gain
counts where it exceeds two of them. Results go to ``--out`` keyed by what defines a run and tl-ray's last commit
to tl_ray/ (a rerun reuses them; ``-dirty`` when tl_ray/ has uncommitted changes, then nothing is reused).

    python bench/toolbox.py --quick      # digits, 30 a class, from the source at depth 3, 3 variants, 1 seed: minutes
    python bench/toolbox.py              # digits and sample, 30 and 100 a class, both starts, 3 seeds: hours
    python bench/toolbox.py --table      # the table from what --out holds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regimes  # (bench/regimes.py: its datasets, epochs, source checkpoints and commit tag)

import tl_ray
from tl_ray.training.config import TrainConfig

# Each variant's train options beside the defaults. The other change's options are listed by the field they need.
CANDIDATES: dict[str, dict[str, Any]] = {
    "trivial": {"augment": "trivial"},
    "randaugment": {"augment": "randaugment"},
    "erasing": {"random_erasing": 0.25},
    "label-smoothing": {"label_smoothing": 0.1},
    "ema": {"ema": 0.999},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
    "layer-decay": {"layer_decay": 0.75},
    "accumulate": {"accumulate": 2},
}
VARIANTS: dict[str, dict[str, Any]] = {
    name: options
    for name, options in CANDIDATES.items()
    if all(key in TrainConfig.__dataclass_fields__ for key in options)  # an option not merged yet is left out
}
TTA = "tta-flip"  # the defaults' checkpoint evaluated with --tta flip: an inference option, no training
DEFAULTS, BEST = "defaults", "best"
# Options of which a combination takes one: the better alone.
EXCLUSIVE = (("trivial", "randaugment"),)
STARTS = {"none": 0, "source": 3}  # from scratch (full fine-tuning), from the source checkpoint at depth 3


@dataclasses.dataclass(frozen=True)
class Row:
    dataset: str
    size: int
    start: str

    @property
    def name(self) -> str:
        return f"{self.dataset} {self.size}/class {'scratch' if self.start == 'none' else 'source d3'}"


def epochs_for(size: int) -> int:
    """regimes.py's epochs for the size nearest ``size`` (digits gives 99 a class: 100's 8)."""
    return regimes.EPOCHS[min(regimes.EPOCHS, key=lambda known: abs(known - size))]


def key(row: Row, variant: str, seed: int, epochs: int, commit: str) -> str:
    return f"{row.dataset}|{row.size}|{row.start}|{variant}|s{seed}|e{epochs}|{commit}"


class Store:
    """Every run's val_acc in one JSON file, keyed by what defines it; saved after each run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.runs, indent=1, sort_keys=True) + "\n")


def combination(gains: dict[str, float]) -> dict[str, Any]:
    """The options of every variant whose mean gain was positive, the better of exclusive ones."""
    chosen = {name for name, gain in gains.items() if gain > 0 and name in VARIANTS}
    for group in EXCLUSIVE:
        present = [name for name in group if name in chosen]
        chosen -= set(sorted(present, key=lambda name: gains[name])[:-1])
    return {k: v for name in sorted(chosen) for k, v in VARIANTS[name].items()}


CHECKPOINTS: dict[tuple[Row, int], str] = {}  # the defaults' best checkpoint of a row and seed, this process's


def run_variant(args, store: Store, row: Row, variant: str, options: dict, seed: int, storage: str) -> float:
    """One training (or, for TTA, the defaults' checkpoint evaluated with --tta flip): its best val_acc. ``--table``:
    only what the store holds (KeyError otherwise)."""
    epochs = args.epochs or epochs_for(row.size)
    tag = variant + (json.dumps(options, sort_keys=True) if variant == BEST else "")
    name = key(row, tag, seed, epochs, args.commit)
    if name in store.runs or args.table:
        return store.runs[name]
    root = Path(args.data) / row.dataset
    task = root / f"target-{row.size}"
    started = time.perf_counter()
    if variant == TTA and (row, seed) in CHECKPOINTS:
        checkpoint = CHECKPOINTS[row, seed]
    else:
        weights = "none" if row.start == "none" else regimes.source_checkpoint(root, row.dataset, args.source_epochs)
        result = regimes.tl_ray_train(
            task, weights, STARTS[row.start], epochs=epochs, seed=seed, storage=storage, name=f"run{len(store.runs)}",
            **({} if variant == TTA else options),
        )  # fmt: skip
        value, checkpoint = result.metrics["val_acc"], str(result.best_checkpoint)
        if variant in (DEFAULTS, TTA):
            CHECKPOINTS[row, seed] = checkpoint
    if variant == TTA:
        value = tl_ray.evaluate(checkpoint, str(task / "val"), tta="flip").metrics["accuracy"]
    print(f"  {row.name} {variant} seed {seed}: {value:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    store.runs[name] = value
    store.save()
    return value


def measure(args, store: Store, row: Row, storage: str) -> dict[str, list[float]]:
    """Every variant of one row on every seed (the defaults first: the others are read against them)."""
    scores: dict[str, list[float]] = {}
    for variant in [DEFAULTS, *([TTA] if args.tta else []), *args.variants]:
        options = VARIANTS.get(variant, {})
        try:
            scores[variant] = [run_variant(args, store, row, variant, options, seed, storage) for seed in args.seeds]
        except KeyError:  # --table: not run yet
            continue
    if DEFAULTS not in scores:
        return {}
    if args.best:
        base = scores[DEFAULTS]
        gains = {v: statistics.mean(scores[v]) - statistics.mean(base) for v in args.variants if v in scores}
        options = combination(gains)
        if len([name for name in gains if gains[name] > 0]) >= 2:  # one alone is its own column already
            try:
                scores[BEST] = [run_variant(args, store, row, BEST, options, seed, storage) for seed in args.seeds]
                scores[BEST + " options"] = options  # type: ignore[assignment]
            except KeyError:
                pass
    return scores


def cell(scores: list[float], base: list[float]) -> str:
    """mean ± sd, and the paired difference from the defaults ± its standard error (* beyond two of them)."""
    mean = statistics.mean(scores)
    sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
    if scores is base:
        return f"{mean:.3f} ± {sd:.3f}"
    differences = [a - b for a, b in zip(scores, base, strict=True)]
    gain = statistics.mean(differences)
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    clear = "*" if not math.isnan(error) and abs(gain) > 2 * error else ""
    return f"{mean:.3f} ± {sd:.3f} ({gain:+.3f}{'' if math.isnan(error) else f' ± {error:.3f}'}{clear})"


def table(results: dict[str, dict[str, list[float]]]) -> str:
    variants = list(dict.fromkeys(v for scores in results.values() for v in scores if not v.endswith(" options")))
    lines = ["| row | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name, scores in results.items():
        base = scores[DEFAULTS]
        cells = [cell(scores[v], base) if v in scores else "" for v in variants]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    combos = [f"- {name}: best = {scores[BEST + ' options']}" for name, scores in results.items() if BEST in scores]
    return "\n".join([*lines, "", *combos])


def sizes(dataset: str, given: list[str], data: Path) -> list[int]:
    """The sizes asked for, "max" read from the dataset's pool (written first if need be)."""
    if "max" in given:
        largest = regimes.pool_size(regimes.prepare(dataset, data, ()))
    return [largest if size == "max" else int(size) for size in given]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets", default="digits,sample", help="of bench/regimes.py's: digits, glyphs, icons, sample"
    )
    parser.add_argument(
        "--sizes", default="30,max", help="training images a class; max: all the dataset has (digits: 99)"
    )
    parser.add_argument("--starts", default="none,source", help="none: from scratch (depth 0); source: depth 3")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=0, help="epochs a run (default: regimes.EPOCHS by size)")
    parser.add_argument("--source-epochs", type=int, default=regimes.SOURCE_EPOCHS)
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="leave out the --tta flip column")
    parser.add_argument("--no-best", dest="best", action="store_false", help="leave out the best combination")
    parser.add_argument("--quick", action="store_true", help="digits, 30 a class, source d3, 3 variants, 1 seed")
    parser.add_argument("--table", action="store_true", help="only print the table of the runs --out holds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="bench/.data/regimes")
    parser.add_argument("--out", default="bench/results/toolbox.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.sizes, args.starts, args.seeds = "digits", "30", "source", "0"
        args.variants = ",".join(v for v in ("trivial", "erasing", "mixup") if v in VARIANTS)
        args.epochs, args.source_epochs, args.best = args.epochs or 3, 4, False
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {', '.join(unknown)} not among {', '.join(VARIANTS)} (not in this TrainConfig?)")
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    args.rows = [
        Row(dataset, size, start)
        for dataset in args.datasets.split(",")
        for size in sizes(dataset, args.sizes.split(","), Path(args.data))
        for start in args.starts.split(",")
    ]
    args.commit = regimes.tl_ray_commit()
    return args


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse(argv)
    torch.set_num_threads(args.threads)
    store = Store(Path(args.out))
    results: dict[str, dict[str, list[float]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        for row in args.rows:
            root = regimes.prepare(row.dataset, Path(args.data), (row.size,))
            if regimes.pool_size(root) < row.size:
                print(f"{row.name}: the dataset has {regimes.pool_size(root)} a class; skipped", flush=True)
                continue
            print(row.name, flush=True)
            scores = measure(args, store, row, storage)
            if scores:
                results[row.name] = scores
    print(f"\ntl-ray {args.commit}, {len(args.seeds)} seed(s), {time.perf_counter() - started:.0f} s\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
