"""What the packaged recipes are: method, backbone, dataset and the one-line description of each.

A recipe's description is its first comment line (the ``# ...`` line before any YAML key); the
packaged recipes keep that line a self-contained summary, the lines after it are details.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from .config import Config, ConfigError, load_config, packaged_config_names, resolve_config_path, validate_config
from .methods import METHODS

__all__ = ["RecipeInfo", "recipe_description", "recipe_info", "list_recipes", "format_recipe_table", "resolved_yaml"]


@dataclass
class RecipeInfo:
    """Summary of one recipe, as listed by ``boxmask recipes``."""

    name: str
    path: Path
    method: str
    arch: str
    supervision: str
    backbone: str
    dataset: str
    description: str


def recipe_description(path: str | Path) -> str:
    """The first comment line of a YAML recipe (before its first key), without ``#``; ``""`` if none."""
    for line in Path(path).read_text().splitlines():
        text = line.strip()
        if not text:
            continue
        return text.lstrip("#").strip() if text.startswith("#") else ""
    return ""


def dataset_name(cfg: Config) -> str:
    """A short name of the recipe's training data: the folder above ``annotations/`` in
    ``data.train_json`` (``datasets/coco/annotations/x.json`` ► ``coco``), else the JSON's stem;
    ``-`` for a template without data."""
    if cfg.data.builtin:
        return f"dsb2018-{cfg.data.builtin} (bundled)"
    if not cfg.data.train_json:
        return "-"
    path = PurePosixPath(cfg.data.train_json.replace("\\", "/"))
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "annotations":
            return parts[i - 1]
    return path.stem


def recipe_info(name_or_path: str | Path) -> RecipeInfo:
    """Summary of a packaged recipe (by name) or a YAML file, also of a template that does not pass
    :func:`~boxmask.config.validate_config` as it is (e.g. no data paths). Raises
    :class:`~boxmask.config.ConfigError` for a missing file, bad YAML or an unknown key."""
    path = resolve_config_path(name_or_path)
    cfg = load_config(path, validate=False)
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    method = METHODS[cfg.supervision.type].title.lower() if cfg.supervision.type in METHODS else cfg.supervision.type
    return RecipeInfo(name=name, path=path, method=method, arch=cfg.model.arch, supervision=cfg.supervision.type,
                      backbone=cfg.model.backbone, dataset=dataset_name(cfg), description=recipe_description(path))


def list_recipes() -> list[RecipeInfo]:
    """Every packaged recipe, sorted by name."""
    return [recipe_info(name) for name in packaged_config_names()]


def format_recipe_table(infos: list[RecipeInfo]) -> str:
    """One row per recipe (name, method, backbone, dataset) with its description indented below."""
    header = ("NAME", "METHOD", "BACKBONE", "DATASET")
    rows = [(i.name, i.method, i.backbone, i.dataset) for i in infos]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]

    def line(cells):
        return "  ".join(cell.ljust(w) for cell, w in zip(cells[:3], widths)) + "  " + cells[3]

    out = [line(header)]
    for info, row in zip(infos, rows):
        out.append(line(row))
        if info.description:
            out.append(f"    {info.description}")
    return "\n".join(out)


def resolved_yaml(name_or_path: str | Path, overrides: list[str] | None = None) -> str:
    """The recipe over the defaults (and ``overrides``) as YAML: every key ``boxmask train`` would use,
    headed by comments naming the file and its description (so the text is itself a recipe). A recipe
    that cannot be trained as it is (a template) is printed too, with the reason in a comment."""
    path = resolve_config_path(name_or_path)
    cfg = load_config(path, overrides, validate=False)
    head = [f"# {path.resolve()}"]
    if description := recipe_description(path):
        head.append(f"# {description}")
    note = f" and {len(overrides)} override(s)" if overrides else ""
    head.append(f"# resolved: the recipe over the defaults{note} (src/boxmask/config.py documents every key)")
    try:
        validate_config(cfg)
    except ConfigError as exc:
        head.append(f"# not trainable as it is: {exc}")
    return "\n".join(head) + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
