"""mkdocs hooks: the config reference (``configs.md``) is written from the schema and the registry
at build time, so it cannot drift from the code: every section's keys with their types and
defaults, and every registered data set, model, objective, constraint and controller with its
options; a page's ``<!-- notebook: NAME.ipynb -->`` becomes that notebook's cells (markdown as it
is, code as Python blocks), so the tutorial page is the notebook the tests run."""

from __future__ import annotations

import inspect
import json
import re
import typing
from pathlib import Path

MARKER = "<!-- config-reference -->"


def _type(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "None").replace("|", "\\|")


def _default(value) -> str:
    import attrs

    if value is attrs.NOTHING or value is inspect.Parameter.empty:
        return "required"
    if isinstance(value, attrs.Factory):
        value = value.factory()
    return f"`{value!r}`" if value not in ({}, ()) else "-"


def sections() -> str:
    import attrs

    from geco_core.training.config import Config

    out = []
    for field in attrs.fields(Config):
        cls = typing.get_type_hints(Config)[field.name]
        cls = typing.get_args(cls)[0] if typing.get_origin(cls) is tuple else cls
        title = f"[[{field.name}]]" if field.name == "constraints" else f"[{field.name}]"
        out += [f"### `{title}`", "", inspect.getdoc(cls) or "", "", "| key | type | default |", "| --- | --- | --- |"]
        hints = typing.get_type_hints(cls)
        for f in attrs.fields(cls):
            if f.name in ("options", "tables"):
                continue
            out.append(f"| `{f.name}` | {_type(hints[f.name])} | {_default(f.default)} |")
        out.append("")
    return "\n".join(out)


def registered() -> str:
    from geco_core.plugins import HOOKS, registry
    from geco_core.training.config import INJECTED

    reg = registry()
    out = []
    for kind in HOOKS:
        out += [f"### {kind.capitalize()}s", ""]
        for entry in sorted(reg.entries[kind].values(), key=lambda e: e.name):
            params = [p for p in entry.parameters().values() if p.name not in INJECTED.get(kind, set())]
            options = ", ".join(f"`{p.name}` = {_default(p.default)}" for p in params) or "none"
            out.append(f"- **`{entry.name}`** ({entry.distribution}): {entry.description} Options: {options}.")
        out.append("")
    return "\n".join(out)


def notebook(path: Path) -> str:
    """The cells of the notebook at ``path`` as markdown: markdown cells as they are, code cells
    as fenced Python blocks."""
    parts = []
    for cell in json.loads(path.read_text())["cells"]:
        text = "".join(cell["source"]).rstrip()
        parts.append(text if cell["cell_type"] == "markdown" else f"```python\n{text}\n```")
    return "\n\n".join(parts) + "\n"


def on_page_markdown(markdown, page, config, files, **kwargs):
    docs = Path(config["docs_dir"])
    markdown = re.sub(r"<!-- notebook: (\S+) -->", lambda m: notebook(docs / m.group(1)), markdown)
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, sections() + "\n## What is registered\n\n" + registered())
