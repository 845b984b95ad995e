"""`tl-ray audit` end to end, once: a small dataset with planted faults (relabelled training images, resized and
re-encoded copies of val images in train, an undecodable file), audited with the session's source checkpoint; the
planted items are found, the files are written and the fix list is a manifest train takes."""

from __future__ import annotations

import csv
import io
import random
import shutil
import sys

import pandas as pd
import pytest
from PIL import Image

from tl_ray import cli, load_checkpoint

PER_CLASS_TRAIN, PER_CLASS_VAL, RELABELLED, COPIES = 30, 10, 6, 4


@pytest.fixture
def faulted(source_data, source_model, checkpoint_probabilities, tmp_path):
    """A subset of the source task with faults planted at random (seeded): their paths, by kind.

    The relabelled images are drawn among those the source model itself puts in their own class with probability
    0.9 or more: images whose features argue for their true label, which is what the audit promises to find. A flip
    of an image the five-epoch model cannot tell apart is a test of that model, not of the audit (CI found 3 and 4 of
    6 when any image could be flipped); the audit's recall on flips of any image is bench/audit.py's to measure."""
    root = tmp_path / "faulted"
    rng = random.Random(0)
    for split, count in (("train", PER_CLASS_TRAIN), ("val", PER_CLASS_VAL)):
        for folder in sorted((source_data / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for path in sorted(folder.glob("*_*.jpg"))[:count]:
                shutil.copy(path, root / split / folder.name / path.name)
    classes = sorted(path.name for path in (root / "train").iterdir())
    assert classes == load_checkpoint(source_model)[1]["class_names"]
    train = sorted((root / "train").glob("*/*.jpg"))
    probabilities = checkpoint_probabilities(source_model, [str(path) for path in train])
    confident = [
        path for path, row in zip(train, probabilities, strict=True) if row[classes.index(path.parent.name)] >= 0.9
    ]
    assert len(confident) >= 4 * RELABELLED, f"the source model is sure of only {len(confident)} training images"
    relabelled = []
    for path in rng.sample(confident, RELABELLED):
        wrong = rng.choice([name for name in classes if name != path.parent.name])
        moved = root / "train" / wrong / f"flipped-{path.name}"
        path.rename(moved)
        relabelled.append(str(moved))
    copies = []
    for path in rng.sample(sorted((root / "val").glob("*/*.jpg")), COPIES):
        image = Image.open(path).convert("RGB")
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        copy = root / "train" / path.parent.name / f"copy-{path.name}"
        copy.write_bytes(buffer.getvalue())
        copies.append({str(path), str(copy)})
    (root / "train" / classes[0] / "broken.jpg").write_bytes(b"not an image")
    return root, relabelled, copies


def test_audit_finds_the_planted_faults(source_model, faulted, tmp_path, ray_cluster, monkeypatch):
    data, relabelled, copies = faulted
    out = tmp_path / "audit"
    printed = io.StringIO()
    monkeypatch.setattr(sys, "stdout", printed)
    # The copies at 0.85, not the default 0.95: on 164 items of a five-epoch model a copy has scored 0.92 with no
    # other pair above 0.77 (the default's recall is bench/audit.py's to measure, on 1,800 and more); here the
    # question is that copies are found, called leaks and left out of the fix list.
    argv = ["audit", "--checkpoint", source_model, "--data", str(data), "--out", str(out), "--fix-list"]
    assert cli.main([*argv, "--duplicate-threshold", "0.85"]) == 0
    console = printed.getvalue()
    assert {path.name for path in out.iterdir()} == {
        "suspects.csv",
        "suspects.png",
        "duplicates.csv",
        "duplicates.png",
        "outliers.csv",
        "fix-list.csv",
        "report.html",
        *(["outliers.png"] if (out / "outliers.png").exists() else []),
    }
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png")))  # every gallery embedded
    assert f"page             {out / 'report.html'}" in console
    suspects = pd.read_csv(out / "suspects.csv")
    # Five of the six planted labels among the first 2x as many suspects: a ranking by chance puts 0.6 of them there
    # (12 of ~125 items).
    top = set(suspects["item"].head(2 * RELABELLED))
    assert len(top & set(relabelled)) >= RELABELLED - 1, suspects.head(12)
    pairs = pd.read_csv(out / "duplicates.csv")
    leaks = [{a, b} for a, b, kind in pairs[["a", "b", "kind"]].itertuples(index=False) if kind == "leak train/val"]
    assert all(copy in leaks for copy in copies), pairs.head(10)
    assert "broken.jpg" in console and f"{len(suspects)} (given label" in console
    assert f"duplicates.csv, {out}/duplicates.png" in console
    with open(out / "fix-list.csv", newline="") as stream:
        kept = list(csv.DictReader(stream))
    paths = {row["path"] for row in kept}
    assert not paths & set(suspects["item"])  # the relabelled images found among them
    assert not {path for copy in copies for path in copy if "/copy-" in path} & paths  # a leak's train copy
    assert {row["split"] for row in kept} == {"train", "val"}
    flagged = set(suspects["item"]) | set(pd.read_csv(out / "outliers.csv")["item"])
    flagged |= {a if kind.startswith("leak") else b for a, b, kind in pairs[["a", "b", "kind"]].itertuples(index=False)}
    assert len(kept) == 4 * (PER_CLASS_TRAIN + PER_CLASS_VAL) + COPIES - len(flagged)
