"""`tl-ray inspect`: what a run would train on, before a long job starts.

The same listing a run makes (``sources.discover``), summarised: the source recognised, the classes and their
counts per split, the imbalance, the rule that chose the validation set, the items that will be skipped and why,
and the image sizes of a sample. Listing-level by default (a sample's headers are the only bytes read); ``decode``
decodes every item, in this process, as the cache build would, to find every file that would be skipped.
"""

from __future__ import annotations

import collections
import io
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tl_ray import location
from tl_ray.inputs import imaging, reading, sources
from tl_ray.inputs.config import InspectConfig
from tl_ray.inputs.layout import Layout

SAMPLE = 64  # images whose sizes are read (headers only) for the size distribution


@dataclass
class Inspection:
    source: str  # what --data was recognised as
    data: str
    class_names: list[str]
    counts: dict[str, dict[str, int]]  # split (train, val; test where there is one) -> class -> items
    val_rule: str
    skipped: list[tuple[str, str]]  # (item as shown, reason): bad items, which a run skips
    sizes: dict[str, list[int]]  # "width", "height": of the sample
    sampled: int
    decoded: bool
    notes: list[str] = field(default_factory=list)
    # (item as shown, reason): items the storage did not deliver within --retry-seconds: not bad, a run reads them
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        """The largest training class over the smallest (1.0: balanced)."""
        train = [count for count in self.counts["train"].values() if count]
        return max(train) / min(train) if train else 0.0


def inspect(config: InspectConfig, sample: int = SAMPLE, threads: int = 8) -> Inspection:
    """Summarise the dataset ``config.data`` names as a run would see it (see the module's docstring)."""
    config = config.validate()
    data_path, decode = config.data, config.decode
    where = location.resolve(data_path, "--data")
    layout = sources.discover(where, config.val_fraction, config.source_options(), config.val_data)
    counts = {}
    splits = (("train", layout.train), ("val", layout.val)) + ((("test", layout.test),) if layout.test else ())
    for split, files in splits:  # test: kept apart, counted only (a class training lacks is not a column)
        found = collections.Counter(label for _, label in files)
        counts[split] = {name: found.get(index, 0) for index, name in enumerate(layout.class_names)}
    skipped = list(layout.rejected)
    strangers = sum(label < 0 for _, label in layout.test)
    notes = list(layout.notes) + [f"{strangers:,} test item(s) of classes training lacks"] * bool(strangers)
    items = [(layout.opener, path) for path, _ in layout.train] + [(layout.val_opener, path) for path, _ in layout.val]
    chosen = items if decode else random.Random(0).sample(items, min(sample, len(items)))

    def look(entry: tuple[sources.Opener, str]) -> tuple[str, tuple[int, int] | str]:
        opener, item = entry
        try:
            raw = reading.read_item(opener, item, layout.retry_seconds)
            if decode:
                return opener.display(item), imaging.load_rgb(raw).size
            with Image.open(io.BytesIO(raw)) as image:  # the header alone
                return opener.display(item), image.size
        except reading.StorageError as error:
            return opener.display(item), str(error)
        except Exception as error:  # a bad item is what inspect is for: report it
            return opener.display(item), imaging.describe_error(error)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        looked = list(pool.map(look, chosen))
    sizes: dict[str, list[int]] = {"width": [], "height": []}
    unreadable = []
    for shown, outcome in looked:
        if isinstance(outcome, str):
            (unreadable if reading.is_unreadable(outcome) else skipped).append((shown, outcome))
        else:
            sizes["width"].append(outcome[0])
            sizes["height"].append(outcome[1])
    return Inspection(
        source=layout.source,
        data=layout.root,
        class_names=layout.class_names,
        counts=counts,
        val_rule=_rule(layout),
        skipped=sorted(set(skipped)),
        sizes=sizes,
        sampled=len(chosen),
        decoded=decode,
        notes=notes,
        unreadable=sorted(unreadable),
    )


def _rule(layout: Layout) -> str:
    """The train/val rule in words (class folders name theirs "folder" and "split")."""
    return {
        "folder": "train/ and val/ folders",
        "split": "a held-out share of train/ by each file's hash (--val-fraction)",
    }.get(layout.val_source, layout.val_source)


def size_summary(values: list[int]) -> str:
    """min / median / max of a list of pixel sizes."""
    if not values:
        return "-"
    return f"{min(values)} / {int(np.median(values))} / {max(values)}"
