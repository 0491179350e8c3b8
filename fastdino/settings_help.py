"""What each setting means, for `--help`: read from the comment beside (or just above) its field in
`fastdino/config.py`, so the code and the help have one source."""
from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
from dataclasses import fields, is_dataclass

from fastdino.config import Config
from fastdino.rules import show


def _field_comments(section: type) -> dict[str, str]:
    """{field name: its comment}: the comment ending the field's line, else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(section))
    tokens = [token for token in tokenize.generate_tokens(io.StringIO(source).readline)
              if token.type == tokenize.COMMENT]
    comments = {token.start[0]: token.string.lstrip("#").strip() for token in tokens}
    whole_lines = {token.start[0] for token in tokens if token.line.lstrip().startswith("#")}
    meanings = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if node.end_lineno in comments:
            meanings[node.target.id] = comments[node.end_lineno]
            continue
        above, line = [], node.lineno - 1
        while line in whole_lines:
            above.insert(0, comments[line])
            line -= 1
        meanings[node.target.id] = " ".join(above)
    return meanings


def settings(section: object | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as typed on the command line, meaning) of every setting, in the config's order."""
    section = Config() if section is None else section
    rows = []
    meanings = _field_comments(type(section))
    for item in fields(section):
        value = getattr(section, item.name)
        if is_dataclass(value):
            rows += settings(value, f"{prefix}{item.name}.")
        else:
            rows.append((prefix + item.name, show(value), meanings.get(item.name, "")))
    return rows


def settings_help(width: int = 118) -> str:
    """Every setting as `key = default  meaning`, wrapped to `width` columns, for `fastdino train --help`."""
    rows = settings()
    key_width = max(len(f"{key} = {default}") for key, default, _ in rows) + 2
    lines = ["settings (key=value, after the --config file's values; default, meaning):"]
    for key, default, meaning in rows:
        head = f"  {key} = {default}".ljust(key_width + 2)
        wrapped = textwrap.wrap(meaning, max(width - len(head), 30)) or [""]
        lines.append(head + wrapped[0])
        lines += [" " * len(head) + rest for rest in wrapped[1:]]
    return "\n".join(lines)
