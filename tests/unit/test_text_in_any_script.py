"""Class names are the user's, in any script: tables align them by the columns a terminal gives them, and the
figures draw them without a warning per missing glyph (tl_ray.cli.render, tl_ray.figures)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pandas as pd
from PIL import Image

from tl_ray.cli import render
from tl_ray.inference import diagnostics, evaluate_report
from tl_ray.inputs.inspect import Inspection

NAMES = ["cat", "猫", "قطة", "e\u0301cole", "ｃａｔ", "🐱 kitten", "Ελληνικά"]


def test_display_width_counts_terminal_columns():
    assert [render.display_width(name) for name in NAMES] == [3, 2, 3, 5, 6, 9, 8]
    assert all(render.display_width(render.pad(name, 12)) == 12 for name in NAMES)
    assert render.pad("a very long class name", 4) == "a very long class name"  # never cut


def test_the_inspection_table_lines_up_in_any_script(capsys):
    counts = {split: {name: 10 + index for index, name in enumerate(NAMES)} for split in ("train", "val")}
    found = Inspection(
        "class folders", "/data", NAMES, counts, "train/ and val/ folders", [], {"width": [], "height": []}, 0, False
    )
    render.inspection(found)
    lines = capsys.readouterr().out.splitlines()
    header = next(index for index, line in enumerate(lines) if line.strip().startswith("class "))
    table = lines[header : header + len(NAMES) + 2]  # header, one row a class, total
    assert {render.display_width(line) for line in table} == {render.display_width(table[0])}, table


def test_the_confusion_matrix_and_per_class_chart_draw_any_script_without_a_warning():
    confusion = pd.DataFrame(np.eye(len(NAMES), dtype=int), index=NAMES, columns=NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's own font alone warns "Glyph ... missing from font(s)"
        pngs = [
            evaluate_report.confusion_png(confusion, 1.0),
            evaluate_report.per_class_png(diagnostics.per_class(confusion)),
        ]
    for png in pngs:
        with Image.open(io.BytesIO(png)) as image:
            assert image.size[0] > 100
