"""`tl-ray predict` / `evaluate` on real Ray, against the model called directly in torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tl_ray
from tl_ray import cli
from tl_ray.errors import TlRayError
from tl_ray.inputs import imaging

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def checkpoint(source_model) -> str:
    return source_model


@pytest.fixture(scope="module")
def mixed_folder(source_data, tmp_path_factory) -> Path:
    """A few val images in nested folders, with spaces and unicode in names, plus two bad files."""
    folder = tmp_path_factory.mktemp("mixed") / "to classify"
    for index, path in enumerate(sorted((source_data / "val").rglob("*.jpg"))[::10]):
        target = folder / ("sub dir" if index % 2 else "ünïcode") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_predictions_equal_the_model_called_directly(checkpoint, mixed_folder, tmp_path, ray_cluster):
    out = tmp_path / "preds.csv"
    assert cli.main(["predict", "--checkpoint", checkpoint, "--data", str(mixed_folder), "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    rows[["error", "predicted"]] = rows[["error", "predicted"]].fillna("")  # empty cells: no error, no class
    images = sorted(str(p) for p in mixed_folder.rglob("*") if p.is_file())
    assert rows["path"].tolist() == images, "one row per file, sorted by path"

    bad = rows[rows["error"] != ""]
    assert sorted(Path(p).name for p in bad["path"]) == ["broken.jpg", "empty.png"]
    assert (bad["predicted"] == "").all()
    good = rows[rows["error"] == ""]
    assert len(good) == len(images) - 2

    model, meta = tl_ray.load_checkpoint(checkpoint)
    transform = imaging.eval_transform(meta["image_size"], imaging.Resize.from_meta(meta))
    batch = torch.stack([transform(imaging.load_rgb(Path(p).read_bytes(), meta["resize_size"])) for p in good["path"]])
    with torch.no_grad():
        expected = torch.softmax(
            model(imaging.normalize(batch, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))), 1
        )
    names = meta["class_names"]
    assert good["predicted"].tolist() == [names[i] for i in expected.argmax(1).tolist()]
    assert good["probability"].to_numpy() == pytest.approx(expected.max(1).values.numpy(), abs=1e-4)
    top2 = expected.topk(2, dim=1)
    assert good["top2_class"].tolist() == [names[i] for i in top2.indices[:, 1].tolist()]
    assert good["top2_prob"].to_numpy() == pytest.approx(top2.values[:, 1].numpy(), abs=1e-4)
    assert {"top3_class", "top3_prob"} <= set(rows.columns) and "top4_class" not in rows.columns


def test_single_image_and_parquet_output(checkpoint, source_data, tmp_path, ray_cluster):
    image = next((source_data / "val" / "star").glob("*.jpg"))
    rows = tl_ray.predict(checkpoint, str(image), out=str(tmp_path / "one.parquet"), top_k=1)
    assert rows["path"].tolist() == [str(image)] and rows["error"].tolist() == [""]
    assert pd.read_parquet(tmp_path / "one.parquet").equals(rows)


def test_evaluate_matches_predict_and_the_training_run(checkpoint, source_run, source_data, tmp_path, ray_cluster):
    out = tmp_path / "eval"
    val = source_data / "val"
    assert cli.main(["evaluate", "--checkpoint", checkpoint, "--data", str(val), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = tl_ray.predict(checkpoint, str(val), top_k=4)  # every class: each image's true class's probability
    truth = rows["path"].map(lambda p: Path(p).parent.name)
    assert metrics["accuracy"] == pytest.approx((rows["predicted"] == truth).mean(), abs=1e-9)
    assert metrics["accuracy"] == pytest.approx(source_run[2]["metrics"]["val_acc"], abs=0.01)
    assert metrics["images"] == 200 and sum(c["support"] for c in metrics["per_class"].values()) == 200
    matrix = metrics["confusion"]["matrix"]
    assert sum(matrix[i][i] for i in range(4)) == round(metrics["accuracy"] * 200)
    misclassified = pd.read_csv(out / "misclassified.csv")
    assert len(misclassified) == 200 - round(metrics["accuracy"] * 200)
    assert (misclassified["true"] != misclassified["predicted"]).all()
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # What went wrong: the loss of each misclassified image is its true class's, the worst first in metrics.json
    # and drawn with their thumbnails; the confused pairs are the matrix's; calibration over the same images.
    rows["true"] = truth
    records = rows.to_dict("records")
    expected = [
        -np.log(row[f"top{k}_prob"]) for row in records for k in range(1, 5) if row[f"top{k}_class"] == row["true"]
    ]
    worst = [row["loss"] for row in metrics["top_losses"]]
    assert len(expected) == 200 and worst == pytest.approx(sorted(expected, reverse=True)[:16], abs=1e-4)
    assert misclassified["loss"].to_numpy() == pytest.approx(-np.log(misclassified["true_probability"]))
    pairs = metrics["most_confused"]
    assert sum(pair["count"] for pair in pairs) == len(misclassified)
    assert [pair["count"] for pair in pairs] == sorted((pair["count"] for pair in pairs), reverse=True)
    assert 0 <= metrics["calibration"]["ece"] <= 1
    assert sum(b["images"] for b in metrics["calibration"]["nonempty_bins"]) == 200
    for name in ("top_losses.png", "per_class.png", "reliability.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('<img src="data:image/png;base64,') == 3  # the figures
    assert page.count('<img src="data:image/jpeg;base64,') == 16  # the worst images
    assert Path(metrics["top_losses"][0]["path"]).name in page
    # The training run's own page, beside its result.json: its curves, a row per epoch, its settings.
    run_page = (source_run[1] / "src" / "report.html").read_text(encoding="utf-8")
    assert run_page.count('<img src="data:image/png;base64,') == 1
    assert run_page.count('<tr><td class="number">') == len(source_run[2]["history"]) > 0
    assert f"<td>data</td><td>{source_data}</td>" in run_page


def test_evaluate_refuses_classes_the_checkpoint_does_not_know(checkpoint, sample_root, ray_cluster):
    with pytest.raises(TlRayError, match=r"classes cross, diamond, hexagon .* not among the checkpoint's classes"):
        tl_ray.evaluate(checkpoint, str(sample_root / "target" / "val"))


@pytest.mark.extended  # make test's 30 minutes (CI ran 35 at 6b881ac): a second Ray of its own
def test_predict_in_its_own_ray_keeps_rays_lines_off_the_console(checkpoint, mixed_folder, tmp_path):
    """`tl-ray predict` as a user runs it (its own Ray): only its own lines reach stdout and stderr, not Ray's core
    worker's (ray-project/ray#57733's line about the classifier actors' constructor arguments) nor a deprecation."""
    import os
    import subprocess
    import sys

    out = tmp_path / "preds.csv"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "tl_ray.cli", "predict", "--checkpoint", checkpoint, "--data", str(mixed_folder)]
    finished = subprocess.run(
        [*argv, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert finished.returncode == 0, finished.stderr
    printed = finished.stdout + finished.stderr
    assert printed.strip().splitlines() == [
        f"wrote {len(pd.read_csv(out))} predictions to {out} (2 files could not be decoded)"
    ]
