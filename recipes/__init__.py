"""Recipes: one module per post-training stage, each with a ``Config`` dataclass, a YAML of
defaults beside it, and ``run(cfg) -> RunResult``. The first line of a recipe's docstring
is its one-line purpose in ``posttrain list``."""

from __future__ import annotations

import difflib
import importlib
import os

from posttrain.errors import UserError

RECIPE_DIR = os.path.dirname(os.path.abspath(__file__))


def recipe_names() -> list[str]:
    """Every recipe in this package, by name."""
    return sorted(
        f[:-3]
        for f in os.listdir(RECIPE_DIR)
        if f.endswith(".py") and not f.startswith("_") and os.path.exists(os.path.join(RECIPE_DIR, f[:-3] + ".yaml"))
    )


def load_recipe(name: str):
    """The recipe module called ``name``."""
    names = recipe_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"unknown recipe {name!r}{hint}; recipes: {', '.join(names)} (see `posttrain list`)")
    return importlib.import_module(f"recipes.{name}")


def defaults_path(name: str) -> str:
    """The YAML of defaults beside recipe ``name``."""
    return os.path.join(RECIPE_DIR, name + ".yaml")


def purpose(module) -> str:
    """The first line of a recipe's docstring."""
    return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
