"""What a table's columns say, for the sources that are tables (manifests, Parquet images): each row's class name
from a label column (names, or integer ids with an optional ``ClassLabel``), its split from a split column, and the
one-line error for a column a table lacks. One reading for both, so a label means the same in either."""

from __future__ import annotations

import pyarrow as pa

from tl_ray.errors import UsageError

_SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}


def label_texts(
    column: pa.ChunkedArray | pa.Array, name: str, shown: str, class_names: list[str] | None
) -> tuple[list[str | None], list[str] | None]:
    """Each row's class name (None: no label) and the source's class order (None: sort the names).

    Integers are class ids: named by ``class_names`` (a ClassLabel), else by their digits, in numeric order."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_floating(kind):
        example = next((value for value in column.to_pylist() if value is not None), None)
        raise UsageError(
            f"--data: label column {name!r} of {shown} holds floats (e.g. {example}); labels must be class names or"
            " integer class ids (a regression target is not a class)"
        )
    values = column.to_pylist()
    if pa.types.is_integer(kind):
        if class_names is not None:
            bad = [value for value in values if value is not None and not 0 <= value < len(class_names)]
            if bad:
                raise UsageError(
                    f"--data: label column {name!r} of {shown} holds {bad[0]}, outside its ClassLabel's"
                    f" {len(class_names)} names"
                )
            return [None if value is None else class_names[value] for value in values], class_names
        order = [str(value) for value in sorted({value for value in values if value is not None})]
        return [None if value is None else str(value) for value in values], order
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind):
        return [None if value in (None, "") else str(value) for value in values], None
    raise UsageError(f"--data: label column {name!r} of {shown} is {kind}; expected class names or integer ids")


def numeric_order(name: str) -> tuple[int, int | str]:
    """A sort key that puts integer ids (their digits as names) in numeric order, before any other name."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def split_values(column: pa.ChunkedArray, name: str, shown: str) -> list[str]:
    """Each row's split from a split column: "train", "val", or "" (empty: held out by hash); else refused."""
    splits = []
    for row, value in enumerate(column.to_pylist()):
        text = "" if value is None else str(value).strip().lower()
        if text and text not in _SPLIT_VALUES:
            raise UsageError(
                f"--data: split column {name!r} of {shown} has {value!r} (row {row + 1}); expected train or val"
                " (or leave it empty: held out by hash)"
            )
        splits.append(_SPLIT_VALUES.get(text, ""))
    return splits


def missing_column(what: str, shown: str, column: str, flag: str, names: list[str]) -> UsageError:
    """The error for a table without a column it needs: its columns, and the flag that names the right one."""
    return UsageError(
        f"--data: {what} {shown} has no {column!r} column (its columns: {', '.join(names) or 'none'}); name yours"
        f" with {flag}"
    )
