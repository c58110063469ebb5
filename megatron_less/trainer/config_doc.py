"""The config reference (docs/config.md), generated from the config classes so it cannot drift:
each key's type, default and meaning (the field's description, else its line's comment in
sections.py). A test fails when the committed page differs from what this prints.

    python -m megatron_less.trainer.config_doc > docs/config.md
"""

from __future__ import annotations

import inspect
import io
import tokenize
import typing

from pydantic import BaseModel

from megatron_less.trainer import sections as C


def _comments(cls: type) -> dict[str, str]:
    """{field: its comments} from the class source: comment lines right above the field and
    comments on its statement's lines (tokenized, so a '#' inside a string is not a comment)."""
    out: dict[str, list[str]] = {}
    current, above, at_start = None, [], True
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("# ").strip()
            if current is not None:
                out[current].append(text)
            elif at_start:
                above.append(text)
        elif tok.type == tokenize.NAME and at_start:
            current = tok.string if tok.start[1] == 4 else None
            if current is not None:
                out[current] = above
            above = []
        elif tok.type == tokenize.NL and at_start and tok.line.strip() == "":
            above = []  # a blank line ends a comment block
        if tok.type == tokenize.NEWLINE:
            current = None
        at_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT) or (
            at_start and tok.type == tokenize.COMMENT)
    return {k: " ".join(v) for k, v in out.items() if v}


def _type(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    return f"`{annotation.__name__ if isinstance(annotation, type) else annotation}`".replace("|", "\\|")


def _default(field) -> str:
    if field.is_required():
        return "required"
    return f"`{field.default!r}`".replace("|", "\\|")


def _rows(cls: type[BaseModel], prefix: str, subsections: bool = True) -> list[str]:
    notes = _comments(cls)
    rows = []
    for name, field in cls.model_fields.items():
        if _is_section(field):
            rows += _rows(field.annotation, f"{prefix}{name}.") if subsections else []  # e.g. algo.dynamic_sampling
            continue
        meaning = (field.description or notes.get(name, "")).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {meaning} |")
    return rows


def _is_section(field) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def reference() -> str:
    head = "| key | type | default | meaning |\n|---|---|---|---|"
    parts = ["# Training config reference", "",
             "Generated from `megatron_less/trainer/sections.py` by `python -m megatron_less.trainer.config_doc`;"
             " a test keeps this page equal to it. Set keys in the YAML file or on the command line"
             " (`megatron-less train CONFIG.yaml optim.lr=1e-6 rollout.n=8`).", "",
             "## top level", "", head, *_rows(C.Config, "", subsections=False)]  # fmt: skip
    for name, field in C.Config.model_fields.items():
        if _is_section(field):
            parts += ["", f"## {name}", "", head, *_rows(field.annotation, f"{name}.")]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
