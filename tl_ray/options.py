"""The option engine: every option of every command is a dataclass field made by ``option``, merged from
defaults < YAML file < flags (or the Python API's keywords).

The YAML file holds the same keys as the command-line flags, with underscores
(``freeze_depth: 3`` for ``--freeze-depth 3``), so a config file and a command line
are interchangeable and one validation covers both. Values are taken as engineers write
them: numbers in any spelling (``lr: 3e-4``, which YAML 1.1 reads as text, ``1_000``,
``.5``, an int for a float), YAML booleans, and lists for the list options
(``freeze_depths: [0, 3, 5]`` as well as ``freeze_depths: 0,3,5``). Every mistake is a
``UsageError`` naming the key, the file and what was expected. ``to_yaml`` writes a config
that ``merge`` reads back into an equal one (``tl-ray ... --print-config``).

Each option is declared once, as a dataclass field made by ``option``: its default, help, choices and bounds.
The flags (``tl_ray.cli.parser`` builds them from the fields), the YAML coercion (by the field's type), the checks
(``check_options``) and ``--print-config`` all read that one declaration. The commands' declarations live beside
what they configure: ``training.config`` (train, lr-find), ``tuning.config`` (tune), ``inputs.config`` (the source
flags, inspect), ``inference.config`` (predict, evaluate, export), ``sample`` (sample-data).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tl_ray.errors import UsageError


def flag(key: str) -> str:
    """The command-line spelling of a config key, used in every error message."""
    return "--" + key.replace("_", "-")


def name_of(field: dataclasses.Field) -> str:
    """How an error names an option: its flag, or a positional argument's name in capitals (OUT)."""
    return field.name.upper() if field.metadata.get(POSITIONAL) else flag(field.name)


# A list-valued option (TuneConfig's freeze_depths, strategies, lrs) holds its canonical comma-separated text,
# "0,3,5", as its flag takes it; a config file or the Python API may give a list, or a single value, instead.
LIST_ITEMS = "list_items"  # field metadata: the item type, and how the error messages describe the items
WORDS = "words"  # field metadata: the texts a number option takes besides numbers (lr: auto)
REQUIRED = "required"  # field metadata: the option has no default; what it must be, for the error
POSITIONAL = "positional"  # field metadata: an argument without a flag
# A mapping option (tune's --grid) holds {option: canonical comma-separated values}; its flag is repeatable
# (--grid OPTION=V1,V2), a config file gives a mapping of option: [values].
MAPPING = "mapping"


def option(
    default: Any,
    help: str,
    *,
    choices: Iterable[str] = (),
    between: tuple[float, float] | None = None,
    positive: bool = False,
    items: tuple[type, str, str] | None = None,
    negative: tuple[str, str] | None = None,
    words: tuple[str, ...] = (),
    required: str | None = None,
    positional: bool = False,
    mapping: bool = False,
) -> Any:
    """A config field declared once: the CLI makes its flag from it (type from the annotation, ``help``, the
    default from the dataclass), ``merge`` coerces YAML values to that type, ``validate`` checks ``choices``,
    ``between`` (inclusive bounds) and ``positive`` (``check_options``; None, where allowed, is not checked).

    ``items``: a list option's item type, how errors describe the items, an example (see ``_coerce_list``);
    ``negative``: a bool option's opposite flag and that flag's help (``--cpu`` for ``--gpu``): one or neither;
    ``words``: the only texts a number option also takes (``--lr auto``);
    ``required``: what the error says the option must be when it is missing (from the flags and the file alike);
    ``positional``: the CLI takes it as an argument without a flag (``tl-ray sample-data OUT``);
    ``mapping``: a repeatable ``OPTION=V1,V2`` flag, a mapping in a config file (``_coerce_mapping``).
    """
    metadata: dict[str, Any] = {"help": help, "choices": tuple(choices), "between": between, "positive": positive}
    if items is not None:
        metadata[LIST_ITEMS] = items
    if negative is not None:
        metadata["negative"] = negative
    if words:
        metadata[WORDS] = words
    if required is not None:
        metadata[REQUIRED] = required
    if positional:
        metadata[POSITIONAL] = True
    if mapping:
        metadata[MAPPING] = True
    return dataclasses.field(default=default, metadata=metadata)


def same_option(config_class: type, key: str) -> Any:
    """Another config's option, for a config that takes it too (TrainConfig the SourceOptions): declared there."""
    declared = config_class.__dataclass_fields__[key]
    return dataclasses.field(default=declared.default, metadata=declared.metadata)


def check_options(config: Any) -> None:
    """The checks each option declares (choices, bounds), in field order; the error names the flag. Options the
    config ignores (its IGNORED: tune's searched ones) are not checked: their values are never used."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None or field.name in getattr(config, "IGNORED", ()):
            continue
        check_field(field, value)


def check_field(field: dataclasses.Field, value: Any) -> None:
    """One option's declared checks (a number option's words, choices, bounds) on ``value``."""
    declared = field.metadata
    words = declared.get(WORDS, ())
    if words and isinstance(value, str):  # a number option's word (lr: auto); merge coerced, the API may not
        if value in words:
            return
        raise UsageError(f"{flag(field.name)} must be {number_or_words(words)}; got {value!r}")
    if declared["choices"] and value not in declared["choices"]:
        raise UsageError(f"{flag(field.name)} must be one of {', '.join(declared['choices'])}; got {value!r}")
    if declared["between"] is not None:
        check_range(field.name, value, *declared["between"])
    if declared["positive"]:
        check_positive(field.name, value)


def coerce_value(config_class: type, key: str, text: str) -> Any:
    """One value of ``config_class``'s option ``key`` from text (a --grid value), coerced and checked by that
    option's own declaration, as its flag's would be; booleans as true/false (yes/no, on/off, 1/0)."""
    field = config_class.__dataclass_fields__[key]
    hint = typing.get_type_hints(config_class)[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if bool in allowed:
        words = {
            "true": True,
            "yes": True,
            "on": True,
            "1": True,
            "false": False,
            "no": False,
            "off": False,
            "0": False,
        }
        if text.strip().lower() not in words:
            raise UsageError(f"{flag(key)} must be true or false; got {text!r}")
        value: Any = words[text.strip().lower()]
    else:
        value = _coerce(key, text, hint, None, None, None, field.metadata.get(WORDS, ()))
    check_field(field, value)
    return value


def canonical_item(value: Any) -> str:
    """A value as a list or mapping option's canonical text holds it: floats as Python writes them, booleans
    lower-case, text stripped."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value).strip()


def _coerce_mapping(key: str, value: Any, path: str | None) -> dict[str, str] | None:
    """A mapping option's canonical {option: "v1,v2"} (option names with underscores) from repeated flags
    ``OPTION=V1,V2`` (a list of them, or one), or a config file's mapping of option: [values] (or "v1,v2")."""
    if value is None:
        return None
    example = "label_smoothing=0,0.1"
    if isinstance(value, dict):
        pairs = [(str(name), items) for name, items in value.items()]
    else:
        pairs = []
        for entry in value if isinstance(value, list | tuple) else [value]:
            name, equals, items = str(entry).partition("=")
            if not equals or not name.strip():
                raise UsageError(f"{_where(path, key)} must be OPTION=V1,V2 like {example}; got {entry!r}")
            pairs.append((name, items))
    mapping: dict[str, str] = {}
    for name, items in pairs:
        option_name = name.strip().replace("-", "_")
        parts = (
            items.split(",") if isinstance(items, str) else list(items) if isinstance(items, list | tuple) else [items]
        )
        texts = [canonical_item(part) for part in parts if canonical_item(part)]
        if not texts:
            raise UsageError(f"{_where(path, key)} {option_name}: give the values to try, like {example}")
        if option_name in mapping:
            raise UsageError(f"{_where(path, key)} {option_name} is given twice: list its values once")
        mapping[option_name] = ",".join(texts)
    return mapping


def check_required(config: Any) -> None:
    """The options declared ``required`` are given (by a flag, the file or a keyword): a separate check, so that a
    config built to check one option alone need not name the required ones."""
    for field in dataclasses.fields(config):
        if getattr(config, field.name) is None and REQUIRED in field.metadata:
            raise UsageError(f"{name_of(field)} is required: {field.metadata[REQUIRED]}")


def check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise UsageError(f"{flag(key)} must be positive; got {value}")


def check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UsageError(f"{flag(key)} must be between {low} and {high}; got {value}")


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}
# Numbers as YAML 1.1 (PyYAML) leaves them as text: 3e-4, 1e-3, 1.5e3, -.5 (and 1_000 wherever it is text).
_NUMBER = re.compile(r"[-+]?(?=\.?\d)(\d[\d_]*)?(\.[\d_]*)?([eE][-+]?\d+)?", re.ASCII)
_INVALID = object()


def _where(path: str | None, key: str) -> str:
    """How an error names the option: ``FILE: key`` for a config file, the flag otherwise."""
    return f"{path}: {key}" if path else flag(key)


def _number(value: Any) -> int | float | None:
    """A finite number from an int, a float or numeric text; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        if text.lstrip("+-").isdigit():
            return int(text)
        number = float(text)
    else:
        return None
    return number if math.isfinite(number) else None


def _convert(value: Any, kind: Any, text: str | None = None) -> Any:
    """``value`` as ``kind`` where that loses nothing, else _INVALID. ``text``: the value as written in a config
    file, which a str option takes when YAML read it as a number (``name: 007``)."""
    if isinstance(value, bool) or kind is bool:  # YAML true/false, and only for bool options
        return value if isinstance(value, bool) and kind is bool else _INVALID
    if kind is str:
        if isinstance(value, str | Path):
            return str(value)
        return text if text is not None and isinstance(value, int | float) else _INVALID
    number = _number(value)
    if number is None:
        return _INVALID
    if kind is float:
        return float(number)
    if kind is int and (isinstance(number, int) or number.is_integer()):
        return int(number)
    return _INVALID


def _coerce(
    key: str,
    value: Any,
    hint: Any,
    path: str | None,
    items: Any = None,
    text: str | None = None,
    words: tuple[str, ...] = (),
    required: str | None = None,
    positional: bool = False,
) -> Any:
    """One value from a config file (``path``), a flag or a keyword (``path`` None), checked against its field's
    type and converted where that loses nothing: numbers in any YAML spelling (3e-4, 1_000, .5; an int for a
    float, an integral float for an int), booleans only as booleans, list options as ``_coerce_list`` says; a
    number option with ``words`` takes those texts too, and no other."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if items is not None:
        return _coerce_list(key, value, path, *items)
    if words:
        if isinstance(value, str) and value.strip() in words:
            return value.strip()
        allowed = tuple(kind for kind in allowed if kind is not str)
    for kind in allowed:
        converted = _convert(value, kind, text)
        if converted is not _INVALID:
            return converted
    names = " or ".join(_TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind))) for kind in allowed)
    if words:
        names = number_or_words(words, nullable=type(None) in allowed and path is not None)  # YAML's null
    hint = " (YAML reads yes, no, on, off as booleans: quote the text)" if isinstance(value, bool) else ""
    raise UsageError(f"{_where(path, key)} must be {names}; got {value!r}{hint if str in allowed else ''}")


def number_or_words(words: tuple[str, ...], nullable: bool = False) -> str:
    """What a number option with ``words`` takes, as an error says it: "a number, auto, select or null"."""
    choices = ["a number", *words, *(["null"] if nullable else [])]
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _coerce_list(key: str, value: Any, path: str | None, items: type, described: str, example: str) -> str:
    """A list option's canonical text ("0,3,5"; numbers as Python writes them) from that text, a list or one value."""
    if isinstance(value, str):
        parts: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    else:
        parts = list(value) if isinstance(value, list | tuple) else [value]
    converted = [_convert(part, items) for part in parts]
    if any(item is _INVALID or (items is str and "," in item) for item in converted):
        if path:
            listed = "[" + example.replace(",", ", ") + "]"
            expected = f"a list of {described} like {listed} (or the same comma-separated: {example})"
        else:
            expected = f"comma-separated {described} like {example}"
        raise UsageError(f"{_where(path, key)} must be {expected}; got {value!r}")
    return ",".join(repr(item) if items is float else str(item).strip() for item in converted)


def list_items(config: Any, key: str) -> list[Any] | None:
    """The items of a list option (from its canonical text), as ``to_yaml`` writes them."""
    items = config.__dataclass_fields__[key].metadata[LIST_ITEMS][0]
    text = getattr(config, key)
    if text is None:
        return None
    return [_convert(part.strip(), items) for part in text.split(",") if part.strip()]


def merge(config_class: type, yaml_path: str | None, overrides: dict[str, Any]):
    """Build a config: dataclass defaults, then the YAML file, then explicit overrides (flags, keywords)."""
    hints = typing.get_type_hints(config_class)
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    if yaml_path:
        loaded, texts = _read_yaml(yaml_path, set(fields))
        for key, value in loaded.items():
            declared = fields[key].metadata
            if MAPPING in declared:
                values[key] = _coerce_mapping(key, value, yaml_path)
                continue
            values[key] = _coerce(
                key, value, hints[key], yaml_path, declared.get(LIST_ITEMS), texts.get(key), declared.get(WORDS, ())
            )
    for key, value in overrides.items():
        if key not in fields:
            raise UsageError(f"unknown option {key!r}; known: {', '.join(sorted(fields))}")
        declared = fields[key].metadata
        if MAPPING in declared:
            values[key] = _coerce_mapping(key, value, None)
            continue
        values[key] = _coerce(key, value, hints[key], None, declared.get(LIST_ITEMS), None, declared.get(WORDS, ()))
    return config_class(**values)


def _read_yaml(path: str, known: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's mapping (keys with underscores), and the text of each plain scalar value as written."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--config: cannot read {path}: {error.strerror or error}") from error
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        texts = _plain_texts(path, node) if isinstance(node, yaml.MappingNode) else {}
        loaded = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"--config: {path} is not valid YAML: {where}{problem}") from error
    finally:
        loader.dispose()
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise UsageError(f"--config: {path} must hold a mapping of option: value, got {type(loaded).__name__}")
    normalised = {str(key).replace("-", "_"): value for key, value in loaded.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise UsageError(f"--config: {path} has unknown keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return normalised, texts


def _plain_texts(path: str, mapping: yaml.MappingNode) -> dict[str, str]:
    """Each top-level key's value as written, where it is a plain scalar; refuses a key given twice (which YAML
    would let the last one win). Read before construction, which folds merge keys (``<<: *base``) into the node."""
    texts: dict[str, str] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in mapping.value:
        key = str(key_node.value).replace("-", "_")
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line = key_node.start_mark.line + 1
        if key in lines:
            raise UsageError(f"--config: {path} sets {key} twice (lines {lines[key]} and {line}); keep one")
        lines[key] = line
        if isinstance(value_node, yaml.ScalarNode) and value_node.style is None:
            texts[key] = value_node.value
    return texts


class _Dumper(yaml.SafeDumper):
    """One option a line; lists inline, as engineers write them: ``freeze_depths: [0, 3, 5]``."""


_Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence("tag:yaml.org,2002:seq", items, True))


def to_yaml(config: Any) -> str:
    """The config as YAML that ``merge`` reads back into an equal config (list options written as lists)."""
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if LIST_ITEMS in field.metadata and value is not None:
            items = list_items(config, field.name)
            value = value if _INVALID in items else items
        if MAPPING in field.metadata and value is not None:  # {option: [values]}, numbers and booleans as such
            value = {name: [_yaml_item(part) for part in text.split(",")] for name, text in value.items()}
        values[field.name] = value
    return yaml.dump(values, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1_000_000)


def _yaml_item(text: str) -> Any:
    """A mapping option's value as YAML should write it: a number or boolean as one, else the text."""
    if text in ("true", "false"):
        return text == "true"
    number = _number(text)
    return text if number is None else number


def int_list(key: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag(key)} must be comma-separated integers like 0,3,5; got {text!r}") from None
