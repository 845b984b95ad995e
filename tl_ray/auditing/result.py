"""What an audit found, as one typed record: what the console prints and the HTML report shows both read it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

TOP = 5  # the rows the console shows of each finding


@dataclass(frozen=True)
class Finding:
    """One kind of finding: all its rows (as its CSV holds them, worst first), where the CSV and the gallery are
    (None: not written, as for a finding with no rows' gallery)."""

    name: str
    rows: pd.DataFrame
    table: str | None
    gallery: str | None

    @property
    def count(self) -> int:
        return len(self.rows)

    def top(self, count: int = TOP) -> list[dict]:
        return self.rows.head(count).to_dict("records")


@dataclass(frozen=True)
class AuditResult:
    """``images``: the items audited a split; ``suspects`` None when --data has no labels (then ``notes`` says
    so); ``fix_list`` the manifest written with --fix-list; ``skipped`` the items that could not be decoded
    (path, reason); ``seconds`` each stage's wall time (features, labels, duplicates, outliers, writing)."""

    out: str
    checkpoint: str
    data: str
    images: dict[str, int]
    labelled: bool
    suspects: Finding | None
    duplicates: Finding
    outliers: Finding
    duplicate_threshold: float
    fix_list: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    report: str | None = None  # report.html: the findings on one page, the galleries embedded

    @property
    def findings(self) -> list[Finding]:
        return [finding for finding in (self.suspects, self.duplicates, self.outliers) if finding is not None]

    @property
    def leaks(self) -> int:
        """Pairs across splits: a val or test image with a copy in an earlier split."""
        return int(self.duplicates.rows["kind"].str.startswith("leak").sum()) if self.duplicates.count else 0
