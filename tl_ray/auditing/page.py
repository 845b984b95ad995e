"""The audit's ``report.html``: what it found on one page a person reads (issue 42), filled from the same record the
console prints (``result.AuditResult``): the counts, each finding's worst rows and its gallery, the skipped items.

The galleries are the PNGs the audit wrote beside it, embedded (the page is self-contained: it opens from a
bucket too); the full lists stay in the CSVs, which the page names."""

from __future__ import annotations

import pandas as pd

from tl_ray import html_report, location
from tl_ray.auditing.result import AuditResult, Finding

ROWS_SHOWN = 25  # each finding's worst rows in its table (the CSV holds them all)
SKIPS_SHOWN = 100


def _table(rows: pd.DataFrame, caption: str) -> html_report.Table:
    shown = rows.head(ROWS_SHOWN)
    cells = [[value if isinstance(value, int | float | str) else str(value) for value in row] for row in shown.values]
    return html_report.Table(list(shown.columns), cells, caption)


def _section(finding: Finding, explained: str, gallery: bytes | None) -> html_report.Section:
    text = [f"{finding.count} found. {explained}"]
    if finding.table:
        text.append(f"All of them: {finding.table}")
    tables = [_table(finding.rows, f"the first {min(finding.count, ROWS_SHOWN)}")] if finding.count else []
    images = [html_report.Image(gallery, alt=f"{finding.name} gallery")] if gallery else []
    return html_report.Section(finding.name.capitalize(), text, tables=tables, images=images)


def page(result: AuditResult, galleries: dict[str, bytes]) -> html_report.Page:
    """The page of ``result``; ``galleries``: each finding's gallery PNG by finding name (absent: none drawn)."""
    facts: list[tuple[str, html_report.Cell]] = [
        ("images audited", ", ".join(f"{count} {split}" for split, count in result.images.items())),
        ("checkpoint", result.checkpoint),
        ("label suspects", result.suspects.count if result.suspects is not None else "no labels: not looked for"),
        ("duplicate pairs", f"{result.duplicates.count} ({result.leaks} across splits), cosine >= "
         f"{result.duplicate_threshold}"),
        ("outliers", result.outliers.count),
        ("fix list", result.fix_list or "not asked for (--fix-list)"),
        ("seconds", ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in result.seconds.items())),
    ]  # fmt: skip
    sections = [html_report.Section("Summary", list(result.notes), facts)]
    explained = {
        "label suspects": "Training images whose given label is unlikely by out-of-sample probabilities (k-fold"
        " linear heads on the checkpoint's features, ranked by cleanlab), lowest score first.",
        "duplicates": "Pairs of the same bytes or of near-identical features, within a split or across splits (a"
        " leak: a held-out image with a copy in training), most similar first.",
        "outliers": "Images far from every class in feature space, farthest first.",
    }
    for finding in result.findings:
        sections.append(_section(finding, explained.get(finding.name, ""), galleries.get(finding.name)))
    if result.skipped:
        rows = [[shown, reason] for shown, reason in result.skipped[:SKIPS_SHOWN]]
        caption = f"{len(result.skipped)} items could not be decoded" + (
            f" (the first {SKIPS_SHOWN})" if len(result.skipped) > SKIPS_SHOWN else ""
        )
        sections.append(html_report.Section("Skipped", tables=[html_report.Table(["item", "reason"], rows, caption)]))
    return html_report.Page("tl-ray audit", sections, subtitle=result.data)


def write(result: AuditResult, target: location.Location, gallery_names: dict[str, str]) -> str:
    """``report.html`` into the audit's folder ``target``, the galleries (file names by finding name, as written
    there) read back to be embedded; its URI."""
    galleries = {}
    for name, file_name in gallery_names.items():
        where = target.join(file_name)
        with where.filesystem.open_input_stream(where.path) as stream:
            galleries[name] = stream.read()
    return html_report.write(page(result, galleries), target.join(html_report.FILE_NAME))
