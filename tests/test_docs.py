"""Docs that are generated or name commands must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from megatron_less.cli import COMMANDS
from megatron_less.trainer import config_doc

REPO = Path(__file__).resolve().parent.parent


def test_config_reference_is_generated_from_the_config_classes():
    page = (REPO / "docs" / "config.md").read_text()
    assert page == config_doc.reference(), (
        "docs/config.md is stale: python -m megatron_less.trainer.config_doc > docs/config.md")
    assert "| `rollout.n` |" in page and "| `eval.before_train` |" in page
    assert "|  |" not in page, "a config field without a description or comment"


def test_every_command_the_readme_names_exists():
    text = (REPO / "README.md").read_text()
    named = set(re.findall(r"(?:^|`)megatron-less ([a-z][a-z-]+)", text, re.M))  # commands in code
    assert {"demo", "plot", "view", "compare", "train", "eval"} <= named
    unknown = sorted(n for n in named if n not in COMMANDS)
    assert not unknown, f"README names commands that do not exist: {unknown}"
    assert (REPO / "docs" / "img" / "viewer.png").is_file()
