"""Every config key with its type, default and one-line description, read from the pydantic sections of
:mod:`mpo_core.plumbing.config`: what ``mpo config keys`` prints and ``docs/config.md`` holds.

``python -m mpo_core.plumbing.config_reference`` rewrites ``docs/config.md`` (a test fails when it is stale).
"""

from __future__ import annotations

import json
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from mpo_core.plumbing.config import CONFIGS_DIR, PipelineConfig, Section

REFERENCE_PAGE = CONFIGS_DIR.parent / "docs" / "config.md"


@dataclass(frozen=True)
class ConfigKey:
    """One key: dotted name, type, default as YAML/JSON reads it ("" for a section), description."""

    key: str
    type: str
    default: str
    description: str


def type_name(annotation: Any) -> str:
    """A field type as a recipe author reads it: ``"cosine" | "linear"``, ``list[str] | null``, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "section"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    return annotation.__name__


def _section_of(annotation: Any) -> type[Section] | None:
    """The section class a field holds (directly or as ``Section | None``), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def config_keys(model: type[Section] = PipelineConfig, prefix: str = "") -> list[ConfigKey]:
    """Every key of ``model`` in declaration order, a nested section's keys after the section itself."""
    keys = []
    for name, field in model.model_fields.items():
        section = _section_of(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = "" if isinstance(default, Section) else json.dumps(default, ensure_ascii=False)
        keys.append(ConfigKey(f"{prefix}{name}", type_name(field.annotation), shown, field.description or ""))
        if section is not None:
            keys += config_keys(section, f"{prefix}{name}.")
    return keys


def keys_text(section: str | None = None) -> str:
    """The keys (of one top-level ``section``, or all) as plain text: ``key  type = default``, then the
    description indented on the next line."""
    lines = []
    for key in config_keys():
        if section is not None and key.key.split(".")[0] != section:
            continue
        default = f" = {key.default}" if key.default else ""
        lines += [f"{key.key}  {key.type}{default}", f"    {key.description}"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """``text`` safe in a Markdown table cell (no column break, no HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def reference_page() -> str:
    """``docs/config.md``: one table per section (key, type, default, description)."""
    lines = [
        "# Configuration keys",
        "",
        "Generated from `mpo_core/plumbing/config.py` by `python -m mpo_core.plumbing.config_reference`;",
        "do not edit by hand. `mpo config keys [SECTION]` prints the same. A recipe (`configs/*.yaml`)",
        "sets any of these keys by section; `--set section.key=value` overrides one. An unknown key or a",
        "wrong type is an error naming the file and the key.",
    ]
    for key in config_keys():
        if "." not in key.key:
            lines += ["", f"## {key.key}", "", key.description, "", "| key | type | default | description |",
                      "|---|---|---|---|"]
            continue
        default = f"`{_cell(key.default)}`" if key.default else "(section)"
        lines.append(f"| `{key.key}` | {_cell(key.type)} | {default} | {_cell(key.description)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    REFERENCE_PAGE.write_text(reference_page(), encoding="utf-8")
    print(f"wrote {REFERENCE_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
