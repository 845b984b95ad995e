"""What `tl-ray evaluate` draws and the page it writes: the confusion matrix, per-class precision and recall, the
reliability diagram, the worst images (``top_losses.png``), and ``report.html`` holding them all.

Every figure is PNG bytes (``figures.png``), written as a file and embedded in the page alike. The worst images'
thumbnails are read here, in the driver, and only those: through ``reading.read_item`` (retried as every read),
decoded as training decodes (``imaging.load_rgb``). One that cannot be read now (deleted since, its storage
down) is shown as a grey square saying why: it was scored, and its row says so; the report does not fail for it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image as PILImage

from tl_ray import figures, html_report
from tl_ray.inputs import imaging, reading

THUMBNAIL = 160  # pixels, the long side of a worst image's thumbnail
THUMBNAIL_QUALITY = 85
MOST_CHARTED = 40  # classes in the per-class chart: the lowest F1 first when there are more
PAIRS_SHOWN = 10  # most-confused pairs on the page (metrics.json keeps more)
NOT_SCORED_SHOWN = 100  # undecodable and unreadable images listed on the page (metrics.json lists all)


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes | None  # None: not read; ``reason`` says why
    reason: str = ""


def read_thumbnails(opener, items: list[str], retry_seconds: float) -> list[Thumbnail]:
    """A JPEG of each item, its long side ``THUMBNAIL`` pixels, read once with the reads' retries; an item that
    fails now gets its reason."""
    thumbnails = []
    for item in items:
        try:
            image = imaging.load_rgb(reading.read_item(opener, item, retry_seconds), THUMBNAIL)
        except reading.StorageError as error:
            thumbnails.append(Thumbnail(None, str(error)))
            continue
        except Exception as error:  # deleted or changed since it was scored
            thumbnails.append(Thumbnail(None, imaging.describe_error(error)))
            continue
        scale = THUMBNAIL / max(image.size)  # small images up too: a 32-pixel image is a speck in a gallery
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)  # a photo: a tenth of its PNG
        thumbnails.append(Thumbnail(buffer.getvalue()))
    return thumbnails


def confusion_png(confusion: pd.DataFrame, accuracy: float) -> bytes:
    plt = figures.pyplot()
    size = max(4.0, 0.6 * len(confusion) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(confusion.to_numpy(), cmap="Blues")
    axes.set_xticks(range(len(confusion)), confusion.columns, rotation=45, ha="right")
    axes.set_yticks(range(len(confusion)), confusion.index)
    axes.set(xlabel="predicted", ylabel="true", title=f"accuracy {accuracy:.3f}")
    peak = confusion.to_numpy().max(initial=0)
    for (i, j), count in np.ndenumerate(confusion.to_numpy()):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.tight_layout()
    return figures.png(figure)


def charted_classes(per_class: dict[str, dict]) -> list[str]:
    """The classes the per-class chart shows: all of them, or the ``MOST_CHARTED`` lowest by F1."""
    names = list(per_class)
    if len(names) <= MOST_CHARTED:
        return names
    return sorted(names, key=lambda name: (per_class[name]["f1"], names.index(name)))[:MOST_CHARTED]


def per_class_png(per_class: dict[str, dict]) -> bytes:
    """Precision and recall of each class, side by side, with its image count."""
    plt = figures.pyplot()
    names = charted_classes(per_class)
    figure, axes = plt.subplots(figsize=(8, max(2.5, 0.32 * len(names) + 1.2)))
    rows = np.arange(len(names))
    precision = [per_class[name]["precision"] for name in names]
    recall = [per_class[name]["recall"] for name in names]
    axes.barh(rows - 0.2, precision, height=0.4, label="precision", color="#4c72b0")
    axes.barh(rows + 0.2, recall, height=0.4, label="recall", color="#dd8452")
    axes.set_yticks(rows, [f"{name} ({per_class[name]['support']})" for name in names])
    axes.invert_yaxis()
    axes.set_xlim(0, 1.0)
    shown = "" if len(names) == len(per_class) else f" (the {len(names)} lowest F1 of {len(per_class)})"
    axes.set(xlabel="share", title=f"precision and recall per class (images){shown}")
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figures.png(figure)


def reliability_png(calibration) -> bytes:
    """The reliability diagram: accuracy against confidence per bin (the diagonal is a calibrated model), and
    how many images each bin holds."""
    plt = figures.pyplot()
    figure, (curve, counts) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges, width = calibration.edges, np.diff(calibration.edges)
    filled = calibration.counts > 0
    curve.bar(
        edges[:-1][filled],
        calibration.accuracy[filled],
        width=width[filled],
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        label="accuracy",
    )
    gap_bottom = np.minimum(calibration.accuracy, calibration.confidence)[filled]
    gap = np.abs(calibration.accuracy - calibration.confidence)[filled]
    curve.bar(
        edges[:-1][filled],
        gap,
        bottom=gap_bottom,
        width=width[filled],
        align="edge",
        facecolor="none",
        edgecolor="#c44e52",
        hatch="///",
        label="gap to confidence",
    )
    curve.plot([0, 1], [0, 1], linestyle="--", color="0.4", linewidth=1, label="calibrated")
    curve.set(ylabel="accuracy", ylim=(0, 1), xlim=(0, 1), title=f"reliability (ECE {calibration.ece:.3f})")
    curve.legend(loc="upper left", fontsize="small")
    counts.bar(edges[:-1], calibration.counts, width=width, align="edge", color="0.55", edgecolor="white")
    counts.set(xlabel="confidence (top-1 probability)", ylabel="images")
    figure.tight_layout()
    return figures.png(figure)


def caption(row) -> str:
    """A worst image's title: its true class, what it was predicted as, with their probabilities, its loss."""
    return (
        f"true {row.true} ({row.true_probability:.2f})\npredicted {row.predicted} ({row.probability:.2f})"
        f"\nloss {row.loss:.2f}"
    )


def top_losses_png(worst: pd.DataFrame, thumbnails: list[Thumbnail]) -> bytes:
    """The worst images in a grid, each titled with its true and predicted class, their probabilities and its
    loss (fastai's ``plot_top_losses``)."""
    plt = figures.pyplot()
    columns = min(4, max(1, len(worst)))
    rows = max(1, -(-len(worst) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.1 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, row, thumbnail in zip(axes.flat, worst.itertuples(index=False), thumbnails, strict=False):
        if thumbnail.jpeg is not None:
            axis.imshow(np.asarray(PILImage.open(io.BytesIO(thumbnail.jpeg))))
        else:
            axis.imshow(np.full((THUMBNAIL, THUMBNAIL, 3), 200, np.uint8))
            axis.text(
                THUMBNAIL / 2,
                THUMBNAIL / 2,
                f"not read:\n{thumbnail.reason[:60]}",
                ha="center",
                va="center",
                fontsize="x-small",
                wrap=True,
            )
        axis.set_title(caption(row), fontsize="small")
    if worst.empty:
        axes.flat[0].text(0.5, 0.5, "no scored images", ha="center", va="center")
    figure.suptitle(f"the {len(worst)} images with the highest loss")
    figure.tight_layout()
    return figures.png(figure)


def page(
    metrics: dict, pngs: dict[str, bytes], worst: pd.DataFrame, thumbnails: list[Thumbnail], data: str
) -> html_report.Page:
    """evaluate's report.html: the numbers, the error gallery, the confusion, per class, calibration."""
    Section, Table, Image = html_report.Section, html_report.Table, html_report.Image
    macro, calibration = metrics["macro"], metrics["calibration"]
    summary = Section(
        "Summary",
        facts=[
            ("accuracy", f"{metrics['accuracy']:.4f} on {metrics['images']} images"),
            ("macro precision / recall / F1", f"{macro['precision']:.3f} / {macro['recall']:.3f} / {macro['f1']:.3f}"),
            ("expected calibration error", f"{calibration['ece']:.4f} ({calibration['bins']} bins)"),
            ("mean loss", f"{metrics['log_loss']:.4f}" + ("" if metrics["loss_exact"] else " (a lower bound)")),
            ("undecodable", len(metrics["undecodable"])),
            ("unreadable", len(metrics.get("unreadable", []))),
            ("data", data),
            ("checkpoint", metrics["checkpoint"]),
        ],
    )
    per_class = metrics["per_class"]
    classes = Section(
        "Per class",
        tables=[
            Table(
                ["class", "precision", "recall", "F1", "images"],
                [[name, row["precision"], row["recall"], row["f1"], row["support"]] for name, row in per_class.items()],
            )
        ],
        images=[Image(pngs["per_class.png"], alt="precision and recall per class")],
    )
    pairs = metrics["most_confused"]
    confused = Section(
        "Confusion",
        text=[] if pairs else ["No image was confused with another class."],
        tables=[
            Table(
                ["true", "predicted as", "images"],
                [[pair["true"], pair["predicted"], pair["count"]] for pair in pairs[:PAIRS_SHOWN]],
                caption=f"the most-confused pairs ({min(len(pairs), PAIRS_SHOWN)} of {len(pairs)})",
            )
        ]
        if pairs
        else [],
        images=[Image(pngs["confusion.png"], alt="confusion matrix (rows true, columns predicted)")],
    )
    missing = [
        [row.path, thumbnail.reason]
        for row, thumbnail in zip(worst.itertuples(index=False), thumbnails, strict=True)
        if thumbnail.jpeg is None
    ]
    gallery = Section(
        "The images with the highest loss",
        text=[f"The {len(worst)} scored images the model was most wrong about (loss: -log p(true class))."],
        images=[
            Image(thumbnail.jpeg, f"{caption(row)}\n{row.path}", caption(row).replace("\n", ", "), "image/jpeg")
            for row, thumbnail in zip(worst.itertuples(index=False), thumbnails, strict=True)
            if thumbnail.jpeg is not None
        ],
        tables=[Table(["image", "not shown: it could not be read now"], missing)] if missing else [],
        gallery=True,
    )
    reliability = Section(
        "Calibration",
        text=[
            "Each bar is the accuracy of the images whose top probability fell in that bin; a calibrated model's"
            " bars reach the diagonal. The expected calibration error is the mean gap, weighted by the images in"
            " each bin."
        ],
        images=[Image(pngs["reliability.png"], alt="reliability diagram", width=520)],
    )
    sections = [summary, gallery, confused, classes, reliability]
    not_scored = [[row["path"], row["error"]] for row in [*metrics["undecodable"], *metrics.get("unreadable", [])]]
    if not_scored:
        shown = (
            f"; the first {NOT_SCORED_SHOWN} here, all in metrics.json" if len(not_scored) > NOT_SCORED_SHOWN else ""
        )
        table = Table(["image", "why"], not_scored[:NOT_SCORED_SHOWN])
        text = f"Images not scored (undecodable, or not delivered by their storage): {len(not_scored)}{shown}."
        sections.append(Section("Not scored", text=[text], tables=[table]))
    return html_report.Page("tl-ray evaluate", sections, subtitle=metrics["checkpoint"])
