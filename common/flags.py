"""Settings declared once, as dataclass fields, and the command-line flags derived from them.

A field made with `option(default, help, ...)` is both a typed setting and the flag `--<name>`: its
default, help and choices stand in the declaration only, and `add_arguments` builds the argparse
arguments from the field's type (`bool` → a switch, `tuple[int, ...]` → several numbers, `X | None` → X).
The inference options (options.py) and the trainers' configs (training.py) are declared this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str | None = None,
    *,
    choices: Iterable[str] | None = None,
    legacy_bool: bool = False,
    **argparse_kwargs: Any,
) -> Any:
    """A field that is also a flag. No default: a required flag. `legacy_bool` also accepts `--flag True`
    (the original's `type=bool`); `argparse_kwargs` are passed on as they are (e.g. nargs="?", const=...)."""
    meta = {"flag": True, "help": help, "choices": tuple(choices) if choices else None, "legacy_bool": legacy_bool,
            "argparse": argparse_kwargs}  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


def str2bool(text: str) -> bool:
    """`--static True` from old command lines (the original's `type=bool`)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags (made with `option`)."""
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def _argument(meta: Mapping[str, Any], hint: object, default: object) -> dict:
    """argparse keywords for one field, from its type hint."""
    kwargs: dict = {"default": default, "help": meta["help"]}
    if hint is bool:
        switch = {"nargs": "?", "const": True, "type": str2bool} if meta["legacy_bool"] else {"action": "store_true"}
        return kwargs | switch | meta["argparse"]
    if isinstance(hint, types.UnionType):  # `int | None`: the flag's type is int
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    if typing.get_origin(hint) is tuple:
        kwargs |= {"nargs": "+", "type": typing.get_args(hint)[0], "default": list(default)}
    elif hint is not str:
        kwargs["type"] = hint
    if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    return kwargs | meta["argparse"]


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    defaults: Mapping[str, object] | None = None,
    required: Iterable[str] = (),
) -> None:
    """`--name` for each flag field of `cls` (or those in `only`), `defaults` overriding the declared ones."""
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else set(only)
    for f in flag_fields(cls):
        if wanted is not None and f.name not in wanted:
            continue
        kwargs = _argument(f.metadata, hints[f.name], (defaults or {}).get(f.name, f.default))
        if f.name in required or f.default is dataclasses.MISSING:
            kwargs |= {"required": True, "default": None}
        parser.add_argument(f"--{f.name}", **kwargs)


def from_namespace(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The values of `cls`'s flag fields present in a parsed namespace, as keyword arguments."""
    values = vars(namespace)
    return {f.name: values[f.name] for f in flag_fields(cls) if f.name in values}
