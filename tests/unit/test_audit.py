"""tl-ray audit's parts on real arrays and files, no Ray: the label check, the blocked duplicate search, the
outliers, the files written, the fix list and the refusals (one line, exit 2, nothing written)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from tl_ray import cli
from tl_ray.auditing import duplicates, features, labels, outliers, writing
from tl_ray.auditing import page as audit_page
from tl_ray.auditing.config import AuditConfig
from tl_ray.auditing.result import AuditResult, Finding
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.imaging import THUMBNAIL_BYTES
from tl_ray.inputs.layout import FileOpener

CPU = torch.device("cpu")


def clusters(per_class: int, classes: int, width: int, seed: int, spread: float = 0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, width)) * 3
    truth = np.repeat(np.arange(classes), per_class)
    return (centres[truth] + rng.normal(0, spread, (len(truth), width))).astype(np.float32), truth


@pytest.mark.slow  # cleanlab's import (scikit-learn) alone takes seconds
def test_label_suspects_rank_planted_flips_first(one_thread):
    features_, truth = clusters(40, 5, 16, seed=0)
    given = truth.copy()
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(given), 10, replace=False)
    given[flipped] = (given[flipped] + rng.integers(1, 5, 10)) % 5
    probabilities = labels.out_of_sample_probabilities(features_, given, 5, folds=5, seed=0, device=CPU)
    assert probabilities.shape == (200, 5)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    paths = np.asarray([f"img{i}.png" for i in range(200)], dtype=object)
    names = ["a", "b", "c", "d", "e"]
    found = labels.suspects(paths, given, probabilities, names)
    assert list(found.columns) == ["item", "given", "suggested", "score"]
    top = set(found["item"].head(20))
    assert len(top & {f"img{i}" + ".png" for i in flipped}) >= 9
    row = found.iloc[0]
    index = int(row["item"][3:-4])
    assert row["given"] == names[given[index]] and row["suggested"] == names[truth[index]]
    assert found["score"].is_monotonic_increasing


@pytest.mark.slow  # cleanlab's import (scikit-learn) alone takes seconds
def test_label_suspects_find_flips_spread_over_many_pairs_of_classes(one_thread):
    """24 flips among 15 classes of 30, spread over the 210 pairs of classes (the benchmark's glyphs: 112 flips,
    about half a pair): cleanlab's default filter (by the pairs' noise rates) flags 14; the suspects, its union with
    the lowest self-confidence, rank more of them in the top 2x, and keep every item the default flags."""
    from cleanlab.filter import find_label_issues

    features_, truth = clusters(30, 15, 16, seed=0, spread=1.5)
    given = truth.copy()
    rng = np.random.default_rng(10)
    flipped = rng.choice(len(given), 24, replace=False)
    given[flipped] = (given[flipped] + rng.integers(1, 15, 24)) % 15
    probabilities = labels.out_of_sample_probabilities(features_, given, 15, folds=5, seed=0, device=CPU)
    default = find_label_issues(given, probabilities, n_jobs=1)
    paths = np.asarray([f"img{i}.png" for i in range(len(given))], dtype=object)
    found = labels.suspects(paths, given, probabilities, [str(i) for i in range(15)])
    planted = {f"img{i}.png" for i in flipped}
    in_top = len(set(found["item"].head(48)) & planted)
    assert int(default[flipped].sum()) < in_top, (int(default[flipped].sum()), in_top)
    assert in_top >= 17
    assert {f"img{i}.png" for i in np.flatnonzero(default)} <= set(found["item"])
    assert found["score"].is_monotonic_increasing


def test_folds_hold_every_class_and_a_class_smaller_than_the_folds():
    assigned = labels.fold_of(np.asarray([0] * 10 + [1] * 2), folds=5, seed=3)
    assert sorted(np.bincount(assigned[:10])) == [2, 2, 2, 2, 2]
    assert len(set(assigned[10:])) == 2  # each of the two is left out by a head that saw the other


def test_blocked_duplicate_search_equals_the_whole_matrix(one_thread):
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (300, 8)).astype(np.float32)
    base[250:] = base[:50] + rng.normal(0, 0.05, (50, 8))  # 50 near copies
    i, j, s = duplicates.near_pairs(base, 0.9, CPU, block=64)
    x = duplicates.whitened(base, CPU).numpy()
    whole = x @ x.T
    want = {(a, b) for a, b in zip(*np.nonzero(np.triu(whole, 1) >= 0.9), strict=True)}
    assert {(int(a), int(b)) for a, b in zip(i, j, strict=True)} == want
    assert len(want) >= 50
    np.testing.assert_allclose(s, whole[i, j], atol=1e-5)
    assert (i < j).all()


def test_duplicates_name_exact_copies_and_leaks_with_the_earlier_split_first(one_thread):
    rng = np.random.default_rng(0)
    feats = rng.normal(0, 1, (40, 8)).astype(np.float32)
    feats[35] = feats[1]  # val item 35 copies train item 1 exactly
    feats[3] = feats[0] * 1.01  # two train items alike
    thumbnails = rng.integers(0, 256, (40, THUMBNAIL_BYTES), dtype=np.uint8)
    thumbnails[3] = thumbnails[0]
    paths = np.asarray([f"p{i}" for i in range(40)], dtype=object)
    splits = np.asarray(["train"] * 30 + ["val"] * 10, dtype=object)
    digests = np.asarray([f"d{i}" for i in range(40)], dtype=object)
    digests[[1, 35]] = "same"
    found = duplicates.find(paths, splits, feats, digests, thumbnails, 0.95, 0.98, CPU, block=16)
    assert list(found.columns) == duplicates.COLUMNS
    rows = {(a, b): (kind, exact) for a, b, _, _, kind, exact in found.itertuples(index=False)}
    # The exact pair is reported though its (random) thumbnails disagree: the same bytes are the same image.
    assert rows == {("p1", "p35"): ("leak train/val", True), ("p0", "p3"): ("within train", False)}
    assert duplicates.kind_of("val", "test") == "leak val/test" and duplicates.kind_of("", "") == "within data"


def _picture(seed: int) -> np.ndarray:
    """A 3x48x48 uint8 picture of smooth blobs (what a thumbnail keeps), different for each seed."""
    rng = np.random.default_rng(seed)
    low = torch.tensor(rng.uniform(0, 255, (1, 3, 6, 6)), dtype=torch.float32)
    return torch.nn.functional.interpolate(low, size=(48, 48), mode="bicubic")[0].clamp(0, 255).to(torch.uint8).numpy()


def test_the_pixel_check_keeps_a_copy_and_drops_a_look_alike(one_thread):
    """Three pairs the features call near duplicates: a copy re-encoded darker and noisier (its thumbnail
    correlates near 1), a look-alike (another picture), and the same picture mirrored. At the default (0.98) only the
    copy is reported; at 0 (the check off), all three."""
    from tl_ray.auditing.config import DUPLICATE_PIXEL_THRESHOLD
    from tl_ray.inputs.imaging import thumbnail

    assert DUPLICATE_PIXEL_THRESHOLD == 0.98

    rng = np.random.default_rng(1)
    original, other = _picture(0), _picture(1)
    noisy = (original.astype(np.float32) * 0.8 + 20 + rng.normal(0, 3, original.shape)).clip(0, 255).astype(np.uint8)
    turned = _picture(3)
    images = [original, noisy, _picture(2), other, turned, turned[:, :, ::-1].copy(), _picture(4), _picture(5)]
    thumbnails = np.stack([thumbnail(image) for image in images])
    assert thumbnails.shape == (8, 3 * 32 * 32) and thumbnails.dtype == np.uint8
    feats = np.random.default_rng(0).normal(0, 1, (8, 16)).astype(np.float32)
    feats[1], feats[3], feats[5] = feats[0] + 0.01, feats[2] + 0.01, feats[4] + 0.01
    paths = np.asarray([f"p{i}" for i in range(8)], dtype=object)
    splits = np.asarray(["train"] * 8, dtype=object)
    digests = np.asarray([""] * 8, dtype=object)
    checked = duplicates.find(paths, splits, feats, digests, thumbnails, 0.9, DUPLICATE_PIXEL_THRESHOLD, CPU)
    assert [(a, b) for a, b in checked[["a", "b"]].itertuples(index=False)] == [("p0", "p1")]
    assert checked["pixel_similarity"].iat[0] > 0.99
    unchecked = duplicates.find(paths, splits, feats, digests, thumbnails, 0.9, 0.0, CPU)
    assert {(a, b) for a, b in unchecked[["a", "b"]].itertuples(index=False)} == {
        ("p0", "p1"),
        ("p2", "p3"),
        ("p4", "p5"),
    }
    assert (unchecked.set_index("a").loc[["p2", "p4"], "pixel_similarity"] < 0.98).all()


def test_the_pair_cap_refuses_a_threshold_that_finds_families(monkeypatch):
    monkeypatch.setattr(duplicates, "MAX_PAIRS", 10)
    with pytest.raises(TlRayError, match="--duplicate-threshold"):
        duplicates.near_pairs(np.ones((20, 4), np.float32) + np.eye(20, 4, dtype=np.float32) * 1e-3, 0.5, CPU, 8)


def test_outliers_are_the_items_far_from_every_class(one_thread):
    feats, truth = clusters(50, 3, 16, seed=2, spread=0.3)
    far = np.random.default_rng(5).normal(0, 1, (3, 16)).astype(np.float32) * 6
    feats = np.concatenate([feats, far])
    given = np.concatenate([truth, [-1, -1, -1]])
    predicted = np.concatenate([truth, [0, 1, 2]])
    paths = np.asarray([f"x{i}" for i in range(len(feats))], dtype=object)
    splits = np.asarray(["train"] * len(feats), dtype=object)
    found = outliers.find(paths, splits, given, predicted, feats, ["a", "b", "c"], 3.5, CPU)
    assert list(found.columns) == outliers.COLUMNS
    assert set(found["item"]) >= {"x150", "x151", "x152"}
    assert len(found) <= 6
    assert found["z"].is_monotonic_decreasing
    assert set(found.loc[found["item"] == "x150", "label"]) == {""}


def _items(root, names: list[str], splits: list[str], label_ids: list[int]) -> features.Items:
    opener = FileOpener(__import__("pyarrow.fs").fs.LocalFileSystem())
    paths = []
    for index, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), (index * 40 % 255, 90, 200)).save(path)
        paths.append(str(path))
    return features.Items(
        paths=np.asarray(paths, dtype=object),
        splits=np.asarray(splits, dtype=object),
        labels=np.asarray(label_ids),
        features=np.zeros((len(names), 4), np.float32),
        digests=np.asarray([""] * len(names), dtype=object),
        thumbnails=np.zeros((len(names), THUMBNAIL_BYTES), np.uint8),
        predicted=np.asarray(label_ids),
        class_names=["cat", "dog"],
        labelled=True,
        where={path: (opener, path) for path in paths},
        skipped=[],
        notes=[],
    )


def _result(out, checkpoint: str, data, images: dict, tables: dict, written: dict) -> AuditResult:
    """The AuditResult the audit would hand its page: each finding's rows and the files written for it."""

    def finding(name: str, table: str) -> Finding:
        return Finding(name, tables[table], written.get(table), written.get(table[:-4] + ".png"))

    return AuditResult(
        out=out.uri,
        checkpoint=checkpoint,
        data=str(data),
        images=images,
        labelled=True,
        suspects=finding("label suspects", writing.SUSPECTS),
        duplicates=finding("duplicates", writing.DUPLICATES),
        outliers=finding("outliers", writing.OUTLIERS),
        duplicate_threshold=0.95,
        seconds={"features": 1.0},
    )


def test_the_files_and_the_fix_list(tmp_path):
    names = ["train/cat/a.png", "train/cat/b.png", "train/dog/c.png", "val/dog/d.png", "val/cat/e.png"]
    items = _items(tmp_path / "data", names, ["train", "train", "train", "val", "val"], [0, 0, 1, 1, 0])
    p = list(items.paths)
    suspects = pd.DataFrame({"item": [p[2]], "given": ["dog"], "suggested": ["cat"], "score": [0.01]})
    pairs = pd.DataFrame(
        {
            "a": [p[0], p[0]],
            "b": [p[4], p[1]],
            "similarity": [0.99, 0.97],
            "pixel_similarity": [0.995, 0.99],
            "kind": ["leak train/val", "within train"],
            "exact": [False, False],
        }
    )
    far = pd.DataFrame({"item": [], "split": [], "label": [], "nearest": [], "distance": [], "z": []})
    flagged = writing.removed(suspects, pairs, far)
    assert flagged == {p[2], p[0], p[1]}  # the suspect, the train copy of a val image, a within-train pair's second
    tables = {writing.SUSPECTS: suspects, writing.DUPLICATES: pairs, writing.OUTLIERS: far}
    tables[writing.FIX_LIST] = writing.fix_list(items, flagged)
    out = writing.check_out(str(tmp_path / "audit"))
    written = writing.write(out, tables, items, 1.0)
    assert set(written) == {
        "suspects.csv",
        "duplicates.csv",
        "outliers.csv",
        "fix-list.csv",
        "suspects.png",
        "duplicates.png",
    }
    assert Image.open(tmp_path / "audit" / "duplicates.png").size[0] > 100
    with open(tmp_path / "audit" / "fix-list.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows == [{"path": p[3], "label": "dog", "split": "val"}, {"path": p[4], "label": "cat", "split": "val"}]
    with open(tmp_path / "audit" / "duplicates.csv", newline="") as stream:
        assert next(csv.reader(stream)) == duplicates.COLUMNS

    # report.html: the findings on one page, each gallery embedded, every user string escaped.
    result = _result(out, "ck<1>", tmp_path / "data", {"train": 3, "val": 2}, tables, written)
    uri = audit_page.write(result, out, {"label suspects": "suspects.png", "duplicates": "duplicates.png"})
    html = (tmp_path / "audit" / "report.html").read_text()
    assert uri == out.join("report.html").uri and html.count("data:image/png;base64,") == 2
    assert "ck&lt;1&gt;" in html and "ck<1>" not in html
    assert all(heading in html for heading in ("Label suspects", "Duplicates", "Outliers", "leak train/val"))


def test_the_audit_writes_into_object_storage(tmp_path, s3_server):
    """--out s3://...: checked as a local folder is (a prefix holding files refused), the files and report.html
    uploaded there, the page's galleries embedded so it opens from the bucket alone."""
    names = ["train/cat/a.png", "train/dog/c.png", "val/dog/d.png", "val/cat/e.png"]
    items = _items(tmp_path / "data", names, ["train", "train", "val", "val"], [0, 1, 1, 0])
    p = list(items.paths)
    suspects = pd.DataFrame({"item": [p[1]], "given": ["dog"], "suggested": ["cat"], "score": [0.02]})
    pairs = pd.DataFrame(
        {"a": [p[0]], "b": [p[3]], "similarity": [0.99], "pixel_similarity": [1.0], "kind": ["leak train/val"]}
    ).assign(exact=True)
    far = pd.DataFrame({"item": [], "split": [], "label": [], "nearest": [], "distance": [], "z": []})
    tables = {writing.SUSPECTS: suspects, writing.DUPLICATES: pairs, writing.OUTLIERS: far}
    tables[writing.FIX_LIST] = writing.fix_list(items, writing.removed(suspects, pairs, far))
    s3_server.create_bucket("audits")
    bucket = s3_server.filesystem()
    with bucket.open_output_stream("audits/taken/notes.txt") as stream:
        stream.write(b"someone else's")
    with pytest.raises(TlRayError, match=r"--out: s3://audits/taken.* holds other files \(notes.txt\)"):
        writing.check_out(s3_server.uri("audits/taken"))

    out = writing.check_out(s3_server.uri("audits/run1"))
    written = writing.write(out, tables, items, 1.0)
    result = _result(out, "ck", tmp_path / "data", {"train": 2, "val": 2}, tables, written)
    audit_page.write(result, out, {"label suspects": "suspects.png", "duplicates": "duplicates.png"})

    stored = {info.base_name: info.size for info in bucket.get_file_info(pafs.FileSelector("audits/run1"))}
    assert set(stored) == {*written, "report.html"} and all(size > 0 for size in stored.values())
    assert written["suspects.csv"].startswith("s3://audits/run1/suspects.csv")
    with bucket.open_input_stream("audits/run1/fix-list.csv") as stream:
        rows = list(csv.DictReader(stream.read().decode().splitlines()))
    assert rows == [{"path": p[2], "label": "dog", "split": "val"}, {"path": p[3], "label": "cat", "split": "val"}]
    with bucket.open_input_stream("audits/run1/report.html") as stream:
        assert stream.read().decode().count("data:image/png;base64,") == 2
    assert not list((tmp_path).glob("**/report.html"))  # nothing written locally on the way


def test_out_must_be_new_or_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    assert writing.check_out(str(tmp_path / "empty")).path.endswith("empty")
    assert writing.check_out(str(tmp_path / "new")).path.endswith("new")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(TlRayError, match=r"--out: .*full holds other files \(notes.txt\)"):
        writing.check_out(str(tmp_path / "full"))
    with pytest.raises(TlRayError, match="is a file"):
        writing.check_out(str(tmp_path / "full" / "notes.txt"))
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def _folders(root, counts: dict[str, int], split: str = "train"):
    for name, count in counts.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index, 0, 0)).save(root / split / name / f"{name}{index}.png")
    return root


def test_plan_lists_as_train_and_refuses_other_classes_and_a_class_of_one(tmp_path):
    data = _folders(tmp_path / "d", {"cat": 3, "dog": 3})
    _folders(data, {"cat": 1, "dog": 1}, "val")
    planned = features.plan(str(data), None, 0.2, SourceOptions(), ["dog", "cat"])
    assert planned.labelled and [g.splits[0] for g in planned.groups] == ["train", "val"]
    assert planned.groups[0].labels == [1, 1, 1, 0, 0, 0]  # the checkpoint's order: dog 0, cat 1
    with pytest.raises(TlRayError, match=r"--checkpoint: its classes \(cat, bird\) differ from --data's"):
        features.plan(str(data), None, 0.2, SourceOptions(), ["cat", "bird"])
    lone = _folders(tmp_path / "lone", {"cat": 3, "dog": 1})
    with pytest.raises(TlRayError, match=r"class\(es\) dog of .* have one image"):
        features.plan(str(lone), None, 0.2, SourceOptions(), ["cat", "dog"])


def test_plan_of_a_folder_without_labels_says_so(tmp_path):
    for index in range(3):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / f"{index}.png")
    planned = features.plan(str(tmp_path), None, 0.2, SourceOptions(), ["cat", "dog"])
    assert not planned.labelled and len(planned.groups[0].items) == 3
    assert "has no labels: duplicates and outliers only" in planned.notes[-1]
    with pytest.raises(TlRayError, match="--fix-list: --data has no labels"):
        writing.check_fix_list(planned, planned.source)


def test_folds_of_one_are_a_usage_error():
    with pytest.raises(UsageError, match="--folds must be at least 2"):
        AuditConfig(checkpoint="c", data="d", out="o", folds=1).validate()


def test_refusals_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    meta = {"arch": "resnet18", "num_classes": 2, "class_names": ["cat", "bird"], "image_size": 32}
    meta |= {"mean": [0.5] * 3, "std": [0.25] * 3}
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    data = _folders(tmp_path / "d", {"cat": 3, "dog": 3})
    out = tmp_path / "out"
    code = cli.main(["audit", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "differ from --data's" in error
    assert not out.exists()


def test_the_pixel_check_keeps_re_encoded_copies_of_small_noisy_colour_images(one_thread):
    """The sample shapes' renders (a shape on a cluttered, noisy ground, some of one brightness as their ground),
    each copied as the suite's audit run plants copies (3/4 size, JPEG quality 80), through the audit's own view of them
    (the validation transform at 48 px, the thumbnail): every copy correlates at or above the default, the two
    colours of one grey included; a grey thumbnail loses some of them (BENCHMARKS.md, "Colour thumbnails")."""
    import io
    import random

    from PIL import Image

    from tl_ray import sample
    from tl_ray.auditing.config import DUPLICATE_PIXEL_THRESHOLD
    from tl_ray.inputs import imaging

    transform = imaging.eval_transform(48)
    rng = random.Random(0)
    thumbnails, greys = [], []
    for index in range(40):
        image = sample.render(sample.SOURCE_CLASSES[index % len(sample.SOURCE_CLASSES)], rng)
        smaller = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        smaller.save(buffer, format="JPEG", quality=80)
        for picture in (image, Image.open(buffer).convert("RGB")):
            seen = transform(picture).numpy()
            thumbnails.append(imaging.thumbnail(seen))
            greys.append(imaging.thumbnail(np.repeat(seen.mean(0, keepdims=True), 3, 0).round().astype(np.uint8)))
    pairs = np.arange(0, 80, 2), np.arange(1, 80, 2)
    colour = duplicates.pixel_similarity(np.stack(thumbnails), *pairs)
    grey = duplicates.pixel_similarity(np.stack(greys), *pairs)
    assert colour.min() >= DUPLICATE_PIXEL_THRESHOLD, sorted(colour)[:3]
    assert (grey < DUPLICATE_PIXEL_THRESHOLD).any()
