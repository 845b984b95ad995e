"""report.html (tl_ray.html_report): one self-contained page, every user string escaped, every image embedded; and
the pages evaluate, a run and a sweep fill."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tl_ray import html_report, location
from tl_ray.inference import evaluate, evaluate_report
from tl_ray.inputs.layout import FileOpener

HOSTILE = '<script>alert("x")</script> & "quotes" \'too\''


class Parsed(HTMLParser):
    """What a browser would find: the tags, the images' sources, the sections' headings, the page's text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self.headings: list[str] = []
        self.text: list[str] = []
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.headings.append(data)


def png(colour=(200, 30, 30), size=(12, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(source: str) -> Image.Image:
    assert source.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), source[:40]
    return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))


def test_every_user_string_is_escaped_and_strong_is_the_only_markup():
    page = html_report.Page(
        HOSTILE,
        [
            html_report.Section(
                HOSTILE,
                text=[f"**best** {HOSTILE}"],
                facts=[(HOSTILE, HOSTILE)],
                tables=[html_report.Table([HOSTILE], [[HOSTILE], [0.12345], [7], [None]], caption=HOSTILE)],
                images=[html_report.Image(png(), caption=HOSTILE, alt=HOSTILE)],
            )
        ],
        subtitle=HOSTILE,
    )
    text = html_report.render(page)
    parsed = Parsed(text)
    assert "script" not in parsed.tags and "<script>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot; &#x27;too&#x27;" in text
    assert parsed.text.count(HOSTILE) >= 7  # as text a reader sees: title, h1, subtitle, h2, dt, dd, th, td, ...
    assert parsed.images[0]["alt"] == HOSTILE  # the attribute holds it whole, quotes and all
    assert "<p><strong>best</strong> &lt;script&gt;" in text
    assert '<td class="number">0.123</td>' in text and '<td class="number">7</td>' in text and "<td></td>" in text


def test_images_are_embedded_and_nothing_is_fetched(tmp_path):
    pictures = [png((255, 0, 0)), png((0, 0, 255), (30, 20))]
    page = html_report.Page(
        "run",
        [
            html_report.Section("one", images=[html_report.Image(pictures[0], caption="red")]),
            html_report.Section("two", images=[html_report.Image(pictures[1])], gallery=True),
        ],
    )
    written = html_report.write(page, location.resolve(tmp_path / "report.html", "--out"))
    assert written == str(tmp_path / "report.html")
    parsed = Parsed((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert [decoded(image["src"]).getpixel((0, 0)) for image in parsed.images] == [(255, 0, 0), (0, 0, 255)]
    assert [decoded(image["src"]).size for image in parsed.images] == [(12, 8), (30, 20)]
    assert parsed.headings == ["one", "two"]
    assert "link" not in parsed.tags and "script" not in parsed.tags
    assert not re.search(r'(src|href)="(https?:)?//', (tmp_path / "report.html").read_text())


def _classified(paths: list[Path], truth: list[str], predicted: list[tuple[str, float]]) -> pd.DataFrame:
    """classify's rows (two listed classes each) with the true class."""
    rows = []
    for path, true, (name, probability) in zip(paths, truth, predicted, strict=True):
        other = next(c for c in ("猫", "dog <b>", "fox") if c != name)
        rows.append(
            {
                "path": str(path),
                "predicted": name,
                "probability": probability,
                "top1_class": name,
                "top1_prob": probability,
                "top2_class": other,
                "top2_prob": 1 - probability,
                "error": "",
                "true": true,
            }
        )
    return pd.DataFrame(rows)


def _evaluation(tmp_path: Path):
    """evaluate's files from scored rows of nine real images, one of the worst deleted before its thumbnail is
    read: (the worst paths, their thumbnails, the figures, the output folder)."""
    classes = ["猫", "dog <b>", "fox"]
    generator = np.random.default_rng(1)
    paths = []
    for index in range(9):
        path = tmp_path / "images" / f"{index}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(generator.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    truth = [classes[index % 3] for index in range(9)]
    predicted = [(classes[index % 3], 0.9) for index in range(6)] + [("fox", 0.8), ("猫", 0.95), ("猫", 0.6)]
    broken = {"path": str(tmp_path / "broken <x>.jpg"), "error": "cannot identify image file", "true": "fox"}
    rows = pd.concat([_classified(paths, truth, predicted), pd.DataFrame([{**broken, "predicted": ""}])])
    scores = evaluate.score(rows.reset_index(drop=True), classes, 4, "/ck <i>")
    worst = scores.worst["path"].tolist()
    # 8's true class (fox) is not among its two listed: p(fox) <= 1 - 0.6 - 0.4, a bound; then p(true) 0.05, 0.2
    assert worst[:3] == [str(paths[8]), str(paths[7]), str(paths[6])] and not scores.metrics["loss_exact"]
    Path(worst[1]).unlink()  # deleted since it was scored
    thumbnails = evaluate_report.read_thumbnails(FileOpener(location.resolve("/", "--data").filesystem), worst, 5)
    out = tmp_path / "eval"
    pngs = evaluate.write_evaluation_files(out, scores, thumbnails, "data & more")
    return worst, thumbnails, pngs, out


def test_evaluate_writes_its_figures_and_one_page_of_them(tmp_path):
    """evaluate's files from scored rows of real images: the worst images read as thumbnails (a deleted one shown
    as not read), every figure a PNG, and report.html with a section per part holding the same pictures."""
    worst, thumbnails, pngs, out = _evaluation(tmp_path)
    assert [thumbnail.jpeg is None for thumbnail in thumbnails] == [False, True, False, False]
    names = {"confusion.png", "per_class.png", "reliability.png", "top_losses.png"}
    assert set(pngs) == names
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert Image.open(io.BytesIO(thumbnails[0].jpeg)).size == (160, 107)  # long side THUMBNAIL

    text = (out / "report.html").read_text(encoding="utf-8")
    parsed = Parsed(text)
    assert parsed.headings == [
        "Summary",
        "The images with the highest loss",
        "Confusion",
        "Per class",
        "Calibration",
        "Not scored",
    ]
    assert "<td>" + html.escape(str(tmp_path / "broken <x>.jpg")) + "</td><td>cannot identify image file</td>" in text
    sources = [image["src"] for image in parsed.images]
    for name in ("per_class.png", "confusion.png", "reliability.png"):
        assert html_report.data_uri(pngs[name]) in sources, name
    gallery = [image for image in parsed.images if image["alt"].startswith("true ")]
    assert [decoded(image["src"]).size for image in gallery] == [(160, 107)] * 3  # the three still there
    assert "dog &lt;b&gt;" in text and "dog <b>" not in text and "/ck &lt;i&gt;" in text
    assert f"{worst[1]}" in text and "not shown" in text  # the deleted one, named with why
    pairs = [("猫", "fox"), ("dog &lt;b&gt;", "猫"), ("fox", "猫")]  # one image each, in the matrix's order
    rows = [f'<tr><td>{true}</td><td>{predicted}</td><td class="number">1</td></tr>' for true, predicted in pairs]
    assert [text.index(row) for row in rows] == sorted(text.index(row) for row in rows)


def test_a_runs_page_holds_its_curves_epochs_and_settings(tmp_path):
    from tl_ray.training import run_page
    from tl_ray.training.config import TrainConfig
    from tl_ray.training.results import TrainResult

    history = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.2 / e, "val_acc": 0.4 + e / 10}
        for e in (1, 2, 3)
    ]
    outcome = TrainResult(
        run_dir=str(tmp_path),
        best_checkpoint=str(tmp_path / "checkpoint_epoch003"),
        last_checkpoint=str(tmp_path / "checkpoint_epoch003"),
        metrics={**history[-1], "val_recall": {"猫": 0.5, "<dog>": 1.0}},
        history=history,
        skipped_files=[{"path": "/d/bad <1>.jpg", "reason": "cannot identify image file"}],
        class_names=["<dog>", "猫"],
        tensorboard=str(tmp_path / "tensorboard"),
    )
    config = TrainConfig(data="/data/<shapes>", name="run & co", epochs=3)
    written = run_page.write(outcome, config, location.resolve(tmp_path, "--storage"))
    text = Path(written).read_text(encoding="utf-8")
    parsed = Parsed(text)
    assert parsed.headings == [
        "Outcome",
        "Epochs",
        "Validation recall per class (best epoch, lowest first)",
        "Skipped files",
        "Settings (config.yaml)",
    ]
    assert [decoded(image["src"]).format for image in parsed.images] == ["PNG"]  # the curves
    assert '<tr><td class="number">3</td><td class="number">0.3333</td>' in text  # epoch 3's train_loss
    assert "<td>data</td><td>/data/&lt;shapes&gt;</td>" in text and "tl-ray train: run &amp; co" in text
    assert '<td>猫</td><td class="number">0.500</td>' in text and "/d/bad &lt;1&gt;.jpg" in text


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next(filter(None, map(shutil.which, BROWSERS)), None)
# Run in the page once it has loaded: each image's state, where --dump-dom returns it (the title).
PROBE = (
    "<script>window.addEventListener('load', () => { document.title = JSON.stringify("
    "[...document.images].map(image => [image.complete, image.naturalWidth, image.naturalHeight])); });</script>"
)


@pytest.mark.slow  # a browser's start: 1-3 s
@pytest.mark.skipif(BROWSER is None, reason="no Chromium or Chrome on PATH (Debian: apt-get install chromium)")
def test_evaluates_page_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    """The page as a browser shows it: headless Chromium loads evaluate's report.html (a copy with a probe script
    added, the page itself has none) and every image on it has decoded, at the size it was written."""
    _, _, pngs, out = _evaluation(tmp_path)
    page = (out / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    argv = [BROWSER, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}"]
    argv += ["--no-first-run", "--dump-dom", probed.as_uri()]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert shown.returncode == 0, shown.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", shown.stdout, re.S)
    assert title, shown.stdout[:500]
    images = json.loads(html.unescape(title.group(1)))
    assert len(images) == len(Parsed(page).images) == 3 + 3  # per class, confusion, reliability; 3 thumbnails
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), images
    sizes = {tuple(Image.open(io.BytesIO(png)).size) for png in pngs.values()}
    assert sizes - {(width, height) for _, width, height in images} == {Image.open(out / "top_losses.png").size}
