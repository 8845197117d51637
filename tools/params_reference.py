"""Write params.yaml, its reference and its JSON Schema from tasks/plumbing/params.py's models.

params.yaml (every key with its default and a one-line comment), docs/reference/params.md and
docs/reference/params.schema.json come from the pydantic models, the one source of every key's type, default,
bounds and description. Every key being in params.yaml is what lets `dvc exp run -S any.key=value` work without
DVC's `+`. `make reference` runs it; a test fails when the committed files differ from what it writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from tasks.plumbing.params import Params  # noqa: E402 (the project's root first on the path, for a plain `python tools/...`)

PARAMS = ROOT / "params.yaml"
REFERENCE = ROOT / "docs/reference/params.md"
SCHEMA = ROOT / "docs/reference/params.schema.json"
BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<", "minItems": "items >="}


def schema() -> dict[str, Any]:
    """params.yaml's JSON Schema: the models' own, titled for editors."""
    generated = Params.model_json_schema()
    generated["title"] = "gpt2-pipeline params.yaml"
    generated["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return generated


def kind(spec: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in spec:
        return "section"
    if "enum" in spec:
        return " \\| ".join(f"`{value}`" for value in spec["enum"])
    if "anyOf" in spec:
        return " or ".join(kind(option, defs) for option in spec["anyOf"])
    if spec.get("type") == "array":
        return f"list of {kind(spec.get('items', {}), defs)}"
    return spec.get("type", "any")


def rows(section: dict[str, Any], prefix: str, defs: dict[str, Any]) -> list[str]:
    """A table row for each key of section, and the rows of its subsections after it."""
    lines, nested = [], []
    for name, spec in section["properties"].items():
        key = f"{prefix}{name}"
        ref = spec.get("$ref")
        if ref:
            nested.append((key, defs[ref.rsplit("/", 1)[1]]))
        bounds = ", ".join(f"{BOUNDS[word]} {spec[word]:,}" for word in BOUNDS if word in spec)
        default = "required" if name in section.get("required", []) else f"`{json.dumps(spec.get('default'))}`"
        if ref:
            default = "(its keys below)"
        text = spec.get("description", "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| `{key}` | {kind(spec, defs)} | {default} | {bounds} | {text} |")
    for key, subsection in nested:
        lines += rows(subsection, f"{key}.", defs)
    return lines


def reference() -> str:
    generated = Params.model_json_schema()
    defs = generated["$defs"]
    lines = [
        "# params.yaml reference",
        "",
        "Generated from `tasks/plumbing/params.py` by `make reference` (do not edit by hand). Every key below is",
        "checked when a stage starts; a key left out of params.yaml takes the default shown, which is the value the",
        "shipped params.yaml sets. Editors that read JSON Schema (VS Code's YAML extension, JetBrains IDEs)",
        "complete and check params.yaml against [params.schema.json](params.schema.json), which params.yaml names on",
        "its first line.",
        "",
        "| key | type | default | bounds | what it does |",
        "| --- | --- | --- | --- | --- |",
        *rows(generated, "", defs),
        "",
    ]
    return "\n".join(lines)


COMMENT_COLUMN = 30  # where the comments start, as far as the key and value leave room


def flow_value(value: Any) -> str:
    """A value as one line of YAML (flow style: a list stays on its key's line)."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1 << 20, allow_unicode=True, sort_keys=False)
        .removesuffix("\n...\n")
        .strip()
    )


def commented(line: str, comment: str | None) -> str:
    return f"{line.ljust(COMMENT_COLUMN - 1)} # {comment}" if comment else line


def section_lines(section: BaseModel, depth: int) -> list[str]:
    """One line for each key of section with its value and description; a subsection as a block under its key."""
    lines, indent = [], "  " * depth
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            lines.append(commented(f"{indent}{name}:", field.description))
            lines += section_lines(value, depth + 1)
        elif isinstance(value, dict) and value and all(isinstance(item, BaseModel) for item in value.values()):
            lines.append(commented(f"{indent}{name}:", field.description))  # sweep.space: a key's settings a line
            for key, item in value.items():
                lines.append(f"{indent}  {key}: {flow_value(item.model_dump(exclude_defaults=True))}")
        elif isinstance(value, list) and value and all(isinstance(item, BaseModel) for item in value):
            lines.append(commented(f"{indent}{name}:", field.description))  # promote.gate: a rule a line, in full
            lines += [f"{indent}  - {flow_value(item.model_dump())}" for item in value]
        else:
            lines.append(commented(f"{indent}{name}: {flow_value(value)}", field.description))
    return lines


def params_yaml() -> str:
    """params.yaml: every section and key with its default, in the models' order."""
    defaults = Params()
    lines = [
        f"# yaml-language-server: $schema={SCHEMA.relative_to(ROOT)}",
        "# Every key with its default and what it does, one section per stage, generated from",
        "# tasks/plumbing/params.py by `make reference` (types and bounds: docs/reference/params.md). Try a value",
        "# with `dvc exp run -S key=value` or `gpt2-pipeline run -S key=value`; change a shipped default in",
        "# tasks/plumbing/params.py.",
    ]
    for name, field in Params.model_fields.items():
        lines += ["", f"{name}:  # {field.description}", *section_lines(getattr(defaults, name), 1)]
    return "\n".join(lines) + "\n"


def main() -> None:
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(reference(), encoding="utf-8")
    SCHEMA.write_text(json.dumps(schema(), indent=2) + "\n", encoding="utf-8")
    PARAMS.write_text(params_yaml(), encoding="utf-8")
    print(f"wrote {PARAMS.relative_to(ROOT)}, {REFERENCE.relative_to(ROOT)} and {SCHEMA.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
