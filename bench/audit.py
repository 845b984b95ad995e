"""Audit benchmark (issue 42 item 4): does `tl-ray audit` find planted faults, and how long does it take?

``planted``: real images the benchmarks use, written by ``regimes.py``'s loaders, all of a dataset's classes as
one ROOT/train, ROOT/val (``--dataset digits``: scikit-learn's handwritten digits, all ten; ``--dataset glyphs``:
fifteen capital letters rendered from the installed fonts, 150 training fonts a letter), with faults planted at
random (seeded): 5% of the training images moved to another class's folder (relabelled), and 3% of the validation
images copied into train (their own class) after a resize (x1.5, bicubic) and a JPEG re-encode (quality 85). A
checkpoint is trained on that faulted set (resnet18 from random weights, 32 px, as a user would, on the data as it
is), then audited. Reported: the share of the relabelled images among the top 2 x (planted) suspects, the share of
planted copies reported as duplicates at the default threshold, and the share of reported pairs that are not
planted copies (false), also without the pairs whose files are closer as pictures (mean grey-level
difference) than the closest planted copy is to its original: duplicates the data held before the planting (the
digits hold near-identical scans of one writer's digit).

``scale``: the audit's time for N images (default 100,000) at 32 px: the digits augmented (random affine, scale,
noise) into N PNGs, audited with the planted run's checkpoint; each stage's time (``AuditResult.seconds``) and a
projection to 1M (features, labels, outliers: linear in N; the duplicate search: quadratic).

    python bench/audit.py planted --seed 0      # ~5 min here
    python bench/audit.py planted --dataset glyphs --seed 0
    python bench/audit.py scale --images 100000 # ~10 min here; run it on a quiet machine for the time
    python bench/audit.py stages --images 100000 # the stages after the features alone (no Ray)
    python bench/audit.py pixels                 # the pixel check's thumbnail variants (no Ray; after planted)
    python bench/audit.py filters                # cleanlab's filters on the planted runs' features (no Ray)

``pixels``: which thumbnail tells a copy from a look-alike. Copies of tl-ray's sample shapes (a shape on a noisy
ground, 48 px, some of one brightness as their ground: the hardest copies measured) made as the suite plants them
(3/4 size, JPEG quality 80), every source val image and ``SHAPES_TRAIN`` train images; and the pairs the features
find at the default threshold in the planted runs' saved features (digits and glyphs, seeds 0 and 1). For each
thumbnail (grey or colour, its side, the blur): the share of sample copies below the default pixel threshold, and
on each planted run the copies kept and the false pairs reported.

``filters``: which of cleanlab's filters flags the label suspects. On each planted run's saved features, the
out-of-sample probabilities as the audit computes them (``labels.out_of_sample_probabilities``, fold seed = the
run's seed), then each filter's flags ranked by self-confidence: the share of the relabelled images in the top
2 x (planted), and how many items are flagged. ``union`` is what ``labels.suspects`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import regimes

import tl_ray
from tl_ray.auditing.config import DUPLICATE_THRESHOLD

RELABEL_SHARE, COPY_SHARE = 0.05, 0.03
RESULTS = Path(__file__).resolve().parent / "results" / "audit"


TRAIN_CAP = 150  # training images a class at most: glyphs' target pool holds ~510 a letter, its source 150


def dataset_root(dataset: str, data: Path) -> Path:
    """All of a regimes dataset's classes as one set, ROOT/train/<class>, ROOT/val/<class>: its source task's
    train/val and its target task's pool/val (the digits: all ten; glyphs: fifteen letters, training capped at
    ``TRAIN_CAP`` a class, sorted by file name, so that no letter outweighs the rest)."""
    written = regimes.prepare(dataset, data, ())
    root = data / f"{dataset}-all"
    if not root.exists():
        for task, train_split in (("source", "train"), ("target", "pool")):
            for split, into in ((train_split, "train"), ("val", "val")):
                for folder in sorted((written / task / split).iterdir()):
                    files = sorted(folder.iterdir())
                    (root / into / folder.name).mkdir(parents=True)
                    for path in files[:TRAIN_CAP] if into == "train" else files:
                        shutil.copy(path, root / into / folder.name / path.name)
    return root


def pixel_distance(a: str, b: str) -> float:
    """Mean absolute difference of two images' grey levels (0-255), b resized (bicubic) to a's size: how far apart
    two files are as pictures, whatever the features say."""
    first = Image.open(a).convert("L")
    second = Image.open(b).convert("L").resize(first.size, Image.Resampling.BICUBIC)
    return float(np.abs(np.asarray(first, dtype=np.float32) - np.asarray(second, dtype=np.float32)).mean())


def plant(clean: Path, faulted: Path, seed: int) -> dict:
    """A copy of ``clean`` with relabelled training images and resized, re-encoded copies of val images in train."""
    shutil.rmtree(faulted, ignore_errors=True)
    shutil.copytree(clean, faulted)
    faulted = faulted.resolve()  # the paths as the audit reports them
    rng = random.Random(seed)
    classes = sorted(path.name for path in (faulted / "train").iterdir())
    train = sorted((faulted / "train").glob("*/*"))
    relabelled = []
    for path in rng.sample(train, round(RELABEL_SHARE * len(train))):
        wrong = rng.choice([name for name in classes if name != path.parent.name])
        moved = faulted / "train" / wrong / f"relabelled-{path.parent.name}-{path.name}"
        path.rename(moved)
        relabelled.append(str(moved))
    val = sorted((faulted / "val").glob("*/*"))
    copies = []
    for path in rng.sample(val, round(COPY_SHARE * len(val))):
        image = Image.open(path).convert("RGB")
        image = image.resize((round(image.width * 1.5), round(image.height * 1.5)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        copy = faulted / "train" / path.parent.name / f"copy-{path.stem}.jpg"
        copy.write_bytes(buffer.getvalue())
        copies.append((str(path), str(copy)))
    return {"relabelled": relabelled, "copies": copies, "train": len(train), "val": len(val)}


def train_checkpoint(data: Path, storage: Path, name: str) -> str:
    result = tl_ray.train(
        data=str(data),
        arch="resnet18",
        weights="none",
        image_size=regimes.IMAGE_SIZE,
        epochs=regimes.SOURCE_EPOCHS,
        seed=0,
        storage=str(storage),
        name=name,
        keep_checkpoints=1,
    )
    print(f"checkpoint val_acc {result.metrics['val_acc']:.3f} ({result.best_checkpoint})", flush=True)
    return str(result.best_checkpoint)


def score(result, planted: dict, threshold: float) -> dict:
    """The planted faults found, with the duplicates as reported at ``threshold`` (the pairs at or above it: a
    subset of an audit's at a lower one, so one audit scores every threshold above its own)."""
    relabelled = set(planted["relabelled"])
    top = list(result.suspects.rows["item"].head(2 * len(relabelled)))
    pairs = result.duplicates.rows[result.duplicates.rows["similarity"] >= threshold]
    reported = {frozenset((a, b)) for a, b in pairs[["a", "b"]].itertuples(index=False)}
    planted_pairs = {frozenset(pair) for pair in planted["copies"]}
    found = planted_pairs & reported
    copies = [s for a, b, s in pairs[["a", "b", "similarity"]].itertuples(index=False) if {a, b} in planted_pairs]
    # A reported pair that is not a planted copy, but whose two files are closer as pictures than the closest planted
    # copy is to its original, is a duplicate the data held before anything was planted (the digits hold
    # near-identical scans of one writer's digit): reported apart, not hidden among the false pairs. The closest
    # copy, not the farthest: on 8x8 scans many pairs of one digit are within the farthest copy's distance.
    copy_distance = min((pixel_distance(*pair) for pair in planted["copies"]), default=0.0)
    unplanted = [tuple(pair) for pair in reported - planted_pairs]
    distances = [pixel_distance(*sorted(pair, key=lambda path: "/val/" in path)) for pair in unplanted]
    preexisting = sum(distance < copy_distance for distance in distances)
    return {
        "threshold": threshold,
        "relabelled": len(relabelled),
        "suspects": result.suspects.count,
        "labels_in_top_2x": round(sum(item in relabelled for item in top) / max(1, len(relabelled)), 4),
        "suspects_precision": round(
            sum(item in relabelled for item in result.suspects.rows["item"]) / max(1, result.suspects.count), 4
        ),
        "copies": len(planted_pairs),
        "pairs_reported": len(reported),
        "copies_found": round(len(found) / max(1, len(planted_pairs)), 4),
        "false_pair_share": round((len(reported) - len(found)) / max(1, len(reported)), 4),
        "copy_pixel_distance_min": round(copy_distance, 2),
        "unplanted_pixel_distances": sorted(round(distance, 2) for distance in distances),
        "preexisting_pairs": preexisting,
        "false_pair_share_beyond_preexisting": round(
            (len(reported) - len(found) - preexisting) / max(1, len(reported)), 4
        ),
        "copy_similarity_min": round(float(min(copies, default=float("nan"))), 4),
        "outliers": result.outliers.count,
    }


@contextlib.contextmanager
def features_kept(path: Path):
    """The audit's pooled features (with paths and splits) saved to ``path`` as the duplicate search receives them:
    so another search rule can be tried on the same features without Ray or a checkpoint."""
    from tl_ray.auditing import duplicates

    find = duplicates.find

    def keeping(paths, splits, features, *args, **kwargs):
        np.savez(path, paths=paths.astype(str), splits=splits.astype(str), features=features)
        return find(paths, splits, features, *args, **kwargs)

    duplicates.find = keeping
    try:
        yield
    finally:
        duplicates.find = find


def planted_run(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    clean = dataset_root(args.dataset, data)
    prefix = "" if args.dataset == "digits" else f"{args.dataset}-"  # the digits' files kept their first names
    faulted = data / f"{args.dataset}-faulted-s{args.seed}"
    planted = plant(clean, faulted, args.seed)
    (data / f"{prefix}planted-s{args.seed}.json").write_text(json.dumps(planted))
    marker = data / f"{prefix}checkpoint-s{args.seed}.txt"
    if marker.exists() and Path(marker.read_text()).exists():
        checkpoint = marker.read_text()
    else:
        checkpoint = train_checkpoint(faulted, data / "runs", f"{prefix}faulted-s{args.seed}")
        marker.write_text(checkpoint)
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else [DUPLICATE_THRESHOLD]
    out = data / f"{prefix}audit-s{args.seed}"
    shutil.rmtree(out, ignore_errors=True)
    with features_kept(data / f"{prefix}features-s{args.seed}.npz"):
        result = tl_ray.audit(checkpoint, str(faulted), str(out), seed=args.seed, duplicate_threshold=min(thresholds))
    rows = [
        {"dataset": args.dataset, "seed": args.seed, **score(result, planted, threshold)} for threshold in thresholds
    ]
    for row in rows:
        print(json.dumps(row), flush=True)
    return {"planted": rows, "seconds": result.seconds, "images": result.images}


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """A new 32 px image from a digit: rotated, scaled, shifted, with noise."""
    image = image.convert("L").resize((32, 32), Image.Resampling.BICUBIC)
    image = image.rotate(rng.uniform(-15, 15), translate=(rng.randint(-3, 3), rng.randint(-3, 3)))
    pixels = np.asarray(image, dtype=np.float32) + np.random.default_rng(rng.randrange(1 << 30)).normal(0, 8, (32, 32))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def synthesise(clean: Path, root: Path, images: int) -> None:
    """``images`` PNGs augmented from the digits, as ROOT/train/<digit> (80%) and ROOT/val/<digit>."""
    if root.exists() and sum(1 for _ in root.glob("*/*/*.png")) == images:
        return
    shutil.rmtree(root, ignore_errors=True)
    sources = sorted(clean.glob("train/*/*"))
    rng = random.Random(0)
    for index in range(images):
        path = sources[index % len(sources)]
        split = "val" if index % 5 == 0 else "train"
        folder = root / split / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        augment(Image.open(path), rng).save(folder / f"{index:07d}.png")


def scale_run(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    clean = dataset_root("digits", data)
    root = data / f"digits-{args.images}"
    started = time.perf_counter()
    synthesise(clean, root, args.images)
    print(f"synthesised {args.images} images in {time.perf_counter() - started:.0f} s", flush=True)
    checkpoint = (data / f"checkpoint-s{args.seed}.txt").read_text()
    out = data / f"audit-scale-{args.images}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = tl_ray.audit(checkpoint, str(root), str(out))
    total = time.perf_counter() - started
    seconds = result.seconds
    factor = 1_000_000 / args.images
    linear = sum(value for key, value in seconds.items() if key != "duplicates")
    projected = (total - seconds["duplicates"]) * factor + seconds["duplicates"] * factor**2
    row = {
        "images": sum(result.images.values()),
        "total_s": round(total, 1),
        "stages_s": seconds,
        "linear_s": round(linear, 1),
        "projected_1m_s": round(projected),
        "suspects": result.suspects.count if result.suspects else 0,
        "pairs": result.duplicates.count,
        "outliers": result.outliers.count,
    }
    print(json.dumps(row), flush=True)
    return {"scale": row}


def stages_run(args: argparse.Namespace) -> dict:
    """The stages after the features, timed alone on synthetic features (N x 512, ten clusters with noise, a few
    labels flipped): no Ray, no images; what the duplicate search and the k-fold heads cost at N."""
    import torch

    from tl_ray.auditing import duplicates, labels, outliers

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, args.images)
    features = np.maximum(rng.normal(0, 1, (10, 512))[truth] + rng.normal(0, 1.5, (args.images, 512)), 0)
    features = features.astype(np.float32)
    given = truth.copy()
    flipped = rng.choice(args.images, args.images // 20, replace=False)
    given[flipped] = (given[flipped] + 1) % 10
    paths = np.asarray([f"{i}" for i in range(args.images)], dtype=object)
    splits = np.asarray(["train"] * args.images, dtype=object)
    cpu = torch.device("cpu")
    seconds = {}
    started = time.perf_counter()
    probabilities = labels.out_of_sample_probabilities(features, given, 10, 5, 0, cpu)
    suspects = labels.suspects(paths, given, probabilities, [str(i) for i in range(10)])
    seconds["labels"] = time.perf_counter() - started
    started = time.perf_counter()
    pairs = duplicates.find(paths, splits, features, np.asarray([""] * args.images, dtype=object), 0.95, cpu)
    seconds["duplicates"] = time.perf_counter() - started
    started = time.perf_counter()
    far = outliers.find(paths, splits, given, given, features, [str(i) for i in range(10)], 3.5, cpu)
    seconds["outliers"] = time.perf_counter() - started
    flagged = set(suspects["item"].head(2 * len(flipped)))
    row = {
        "images": args.images,
        "torch_threads": torch.get_num_threads(),
        "seconds": {key: round(value, 1) for key, value in seconds.items()},
        "flips_in_top_2x": round(len(flagged & set(paths[flipped])) / len(flipped), 4),
        "pairs": len(pairs),
        "outliers": len(far),
    }
    print(json.dumps(row), flush=True)
    return {"stages": row}


@dataclass(frozen=True)
class SavedRun:
    """What a ``planted`` run leaves for the offline studies: its audit's features (``features_kept``), the faults
    it planted and its checkpoint."""

    seed: int
    paths: np.ndarray
    features: np.ndarray
    planted: dict
    checkpoint: str


def saved_runs(data: Path) -> Iterator[tuple[str, SavedRun]]:
    """The planted runs on disk ("digits s0", ... "glyphs s1"), each with what it saved; a run not made yet is
    named and left out."""
    for dataset, prefix in (("digits", ""), ("glyphs", "glyphs-")):  # the digits' files kept their first names
        for seed in (0, 1):
            saved, marker = data / f"{prefix}features-s{seed}.npz", data / f"{prefix}checkpoint-s{seed}.txt"
            if not saved.exists() or not marker.exists():
                print(f"{dataset} seed {seed}: no planted run yet, left out", flush=True)
                continue
            features = np.load(saved)
            planted = json.loads((data / f"{prefix}planted-s{seed}.json").read_text())
            run = SavedRun(seed, features["paths"], features["features"], planted, marker.read_text().strip())
            yield f"{dataset} s{seed}", run


SHAPES_TRAIN = 400
THUMBNAILS = (  # (name, colour, side, blur sigma)
    ("grey 32 px", False, 32, 0.0),
    ("grey 8 px", False, 8, 0.0),
    ("colour 32 px", True, 32, 0.0),
    ("colour 16 px", True, 16, 0.0),
    ("colour 8 px", True, 8, 0.0),
    ("colour 32 px, blur 0.7", True, 32, 0.7),
    ("colour 32 px, blur 1.0", True, 32, 1.0),
)


def pixels_run(args: argparse.Namespace) -> dict:
    import torch

    from tl_ray.auditing import duplicates
    from tl_ray.auditing.config import DUPLICATE_PIXEL_THRESHOLD
    from tl_ray.inputs import imaging

    data = Path(args.data)

    def seen(meta: dict):
        transform = imaging.eval_transform(meta["image_size"], imaging.Resize.from_meta(meta))
        return lambda image: transform(image).numpy()

    def copied(path: Path) -> Image.Image:
        image = Image.open(path).convert("RGB")
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        return Image.open(buffer).convert("RGB")

    sample = data / "pixels-sample"
    if not sample.exists():
        tl_ray.write_sample_data(str(sample), per_class=200, seed=0)
    view = seen({"image_size": 48})
    shapes = sorted(sample.glob("source/val/*/*.jpg")) + sorted(sample.glob("source/train/*/*.jpg"))[:SHAPES_TRAIN]
    views = {"shapes": [(view(Image.open(path).convert("RGB")), view(copied(path))) for path in shapes]}
    planted_pairs = {}
    for key, saved in saved_runs(data):
        view = seen(tl_ray.load_checkpoint(saved.checkpoint)[1])
        first, second, _ = duplicates.near_pairs(saved.features, DUPLICATE_THRESHOLD, torch.device("cpu"))
        copies = {frozenset(pair) for pair in saved.planted["copies"]}
        paths = saved.paths
        views[key] = [
            (view(Image.open(paths[i]).convert("RGB")), view(Image.open(paths[j]).convert("RGB")))
            for i, j in zip(first, second, strict=True)
        ]
        planted_pairs[key] = np.array(
            [frozenset((paths[i], paths[j])) in copies for i, j in zip(first, second, strict=True)]
        )

    def scores(pairs: list, colour: bool, side: int, sigma: float) -> np.ndarray:
        grey = (
            (lambda x: x) if colour else (lambda x: np.repeat(x.mean(0, keepdims=True), 3, 0).round().astype(np.uint8))
        )
        thumbnails = np.stack([imaging.thumbnail(grey(x), side) for pair in pairs for x in pair])
        return duplicates.pixel_similarity(
            thumbnails, np.arange(0, len(thumbnails), 2), np.arange(1, len(thumbnails), 2), sigma=sigma
        )

    rows = []
    for name, colour, side, sigma in THUMBNAILS:
        shape_scores = scores(views["shapes"], colour, side, sigma)
        row = {
            "thumbnail": name,
            "shape_copies": len(shape_scores),
            "shape_copies_below": round(float((shape_scores < DUPLICATE_PIXEL_THRESHOLD).mean()), 4),
            "shape_copy_lowest": round(float(shape_scores.min()), 4),
        }
        for key, is_copy in planted_pairs.items():
            kept = scores(views[key], colour, side, sigma) >= DUPLICATE_PIXEL_THRESHOLD
            found, false = int(is_copy[kept].sum()), int((~is_copy[kept]).sum())
            row[key] = f"{found}/{int(is_copy.sum())} copies, {false}/{int(kept.sum())} false"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"pixel_threshold": DUPLICATE_PIXEL_THRESHOLD, "rows": rows}


FILTERS = ("prune_by_noise_rate", "low_self_confidence", "union", "predicted_neq_given", "every item")


def filters_run(args: argparse.Namespace) -> dict:
    import torch
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from tl_ray.auditing import labels

    rows = []
    for key, saved in saved_runs(Path(args.data)):
        paths = saved.paths
        folders = np.asarray([Path(path).parent.name for path in paths])
        classes = sorted(set(folders))
        given = np.searchsorted(classes, folders)
        relabelled = set(saved.planted["relabelled"])
        probabilities = labels.out_of_sample_probabilities(
            saved.features, given, len(classes), 5, saved.seed, torch.device("cpu")
        )
        scores = get_label_quality_scores(given, probabilities)
        flags = {
            name: find_label_issues(given, probabilities, filter_by=name, n_jobs=1)
            for name in ("prune_by_noise_rate", "low_self_confidence", "predicted_neq_given")
        }
        flags["union"] = flags["prune_by_noise_rate"] | flags["low_self_confidence"]
        flags["every item"] = np.ones(len(given), dtype=bool)
        row = {"run": key, "relabelled": len(relabelled)}
        for name in FILTERS:
            flagged = np.flatnonzero(flags[name])
            ranked = paths[flagged[np.argsort(scores[flagged], kind="stable")]]
            top = sum(path in relabelled for path in ranked[: 2 * len(relabelled)])
            row[name] = {"labels_in_top_2x": round(top / len(relabelled), 4), "flagged": len(flagged)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("planted", "scale", "stages", "pixels", "filters"))
    parser.add_argument("--data", default="bench/.data/regimes")
    parser.add_argument("--dataset", choices=("digits", "glyphs"), default="digits", help="planted: which data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresholds", default="", help="comma-separated duplicate thresholds (default: the option's)")
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args(argv)
    runs = {"planted": planted_run, "scale": scale_run, "stages": stages_run, "pixels": pixels_run}
    outcome = {**runs, "filters": filters_run}[args.what](args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.what if args.what in ("pixels", "filters") else f"{args.what}-{args.images}"
    if args.what == "planted":
        name = f"planted-s{args.seed}" if args.dataset == "digits" else f"planted-{args.dataset}-s{args.seed}"
    (RESULTS / f"{name}.json").write_text(json.dumps(outcome, indent=2) + "\n")
    return outcome


if __name__ == "__main__":
    main()
