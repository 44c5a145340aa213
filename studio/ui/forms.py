"""Config dataclass -> Gradio form components, and component values -> validated config."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection
from typing import Any

import gradio as gr


def field_kwargs(config_cls: type, name: str) -> dict[str, Any]:
    """label, info and default value of one field, from its metadata."""
    f = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    default = None
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    return {
        "label": f.metadata.get("label", name.replace("_", " ").capitalize()),
        "info": f.metadata.get("help"),
        "value": default,
    }


def build_form(
    config_cls: type, exclude: Collection[str] = ()
) -> dict[str, gr.components.Component]:
    """One component per dataclass field (scalars only), in field order."""
    hints = typing.get_type_hints(config_cls)
    components = {}
    for name in form_fields(config_cls, exclude):
        kind = hints[name]
        common = field_kwargs(config_cls, name)
        if typing.get_origin(kind) is typing.Literal:
            components[name] = gr.Dropdown(choices=list(typing.get_args(kind)), **common)
        elif kind is bool:
            components[name] = gr.Checkbox(**common)
        elif kind in (int, float):
            components[name] = gr.Number(precision=0 if kind is int else None, **common)
        else:
            components[name] = gr.Textbox(**common)
    return components


def form_fields(config_cls: type, exclude: Collection[str] = ()) -> list[str]:
    """Names of the fields build_form makes components for (scalars and Literals), in order."""
    hints = typing.get_type_hints(config_cls)
    return [
        f.name
        for f in dataclasses.fields(config_cls)
        if f.name not in exclude
        and (
            hints[f.name] in (bool, int, float, str)
            or typing.get_origin(hints[f.name]) is typing.Literal
        )
    ]


def config_values(config_cls: type, named: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The values in `named` (form values by name) that set a field of `config_cls` (named
    `prefix + field`), typed as the field is; an empty value is left out, so the config's own
    default applies."""
    hints = typing.get_type_hints(config_cls)
    out = {}
    for f in dataclasses.fields(config_cls):
        value = named.get(prefix + f.name)
        if value is None or (value == "" and hints[f.name] is not str):
            continue
        if hints[f.name] is int:
            value = int(value)
        elif hints[f.name] is float:
            value = float(value)
        out[f.name] = value
    return out
