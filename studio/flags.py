"""Command-line flags made from a step's config dataclass: one flag per field, named after it (with
a dashed twin, and aliases such as `olive finetune`'s), typed from its annotation, with its help."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

PREFIX = "config_"  # flags land in args.config_<field>, apart from the command's own options


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    aliases: dict[str, tuple[str, ...]] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """A flag per field of `config_cls` (default None: unset flags leave the config's default)."""
    aliases = aliases or {}
    group = parser.add_argument_group(f"settings ({config_cls.__name__} fields)")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        names += aliases.get(f.name, ())
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {
            "dest": PREFIX + f.name,
            "default": None,
            "help": f"{f.metadata.get('help', '')} (default: {default!r})",
        }
        origin = typing.get_origin(kind)
        if origin is typing.Literal:
            kwargs["choices"] = typing.get_args(kind)
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            kwargs["type"] = kind
            kwargs["metavar"] = f.name.upper()
        elif kind is list or origin is list:
            kwargs["nargs"] = "+"
            kwargs["metavar"] = f.name.upper()
        elif kind is dict or origin is dict:
            kwargs["type"] = _mapping
            kwargs["metavar"] = "KEY=VALUE,..."
        else:
            kwargs["metavar"] = f.name.upper()
        group.add_argument(*names, **kwargs)


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The fields whose flags were given."""
    return {
        name.removeprefix(PREFIX): value
        for name, value in vars(args).items()
        if name.startswith(PREFIX) and value is not None
    }


def _mapping(text: str) -> dict[str, str]:
    pairs = [p for p in text.split(",") if p.strip()]
    if any("=" not in p for p in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas: {text!r}")
    return dict(p.split("=", 1) for p in pairs)
