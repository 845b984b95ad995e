"""The figures tl-ray writes (the confusion matrix, the LR range test, the sweep report), drawn by one pyplot set up
once: for files (Agg, never a window), and for text in any script, since class names are the user's (猫, قطة, 🐱).

matplotlib's own font (DejaVu Sans) lacks CJK, and much else, and warns once per missing glyph per figure. Its font
fallback (3.6+) draws each glyph from the first family that has it: DejaVu Sans, then any wide-coverage family this
machine has (Noto CJK, WenQuanYi, Droid Sans Fallback, Arial Unicode), then matplotlib's bundled Last Resort font,
which has a placeholder for every code point, so nothing is missing and nothing warns. Install fonts-noto-cjk (or
any of those) to see the glyphs themselves.
"""

from __future__ import annotations

from types import ModuleType

WIDE_COVERAGE = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans",
    "Noto Sans Arabic",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "Arial Unicode MS",
)
LAST_RESORT = "Last Resort High-Efficiency"  # bundled with matplotlib >= 3.6


def pyplot() -> ModuleType:
    """matplotlib.pyplot, drawing to files, with the font families above (those installed) as its fallback chain."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    fallback = [name for name in (*WIDE_COVERAGE, LAST_RESORT) if name in installed]
    matplotlib.rcParams["font.family"] = ["DejaVu Sans", *fallback]
    return plt


def png(figure, dpi: int = 100) -> bytes:
    """``figure`` as PNG bytes, closed: what is written as a file and embedded in a report.html alike."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()
