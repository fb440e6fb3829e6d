"""The ``compressor`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

__all__ = ["main"]


def _schedule(value: float | None, unset: str) -> str:
    return unset if value is None else f"{value:g}"


def _recipe_check(args: argparse.Namespace) -> int:
    from compressor.recipe import Recipe

    recipe = Recipe.from_file(Path(args.file))
    print(
        f"{args.file}: valid, {len(recipe.modifiers)} modifier(s) in {len(recipe.stages)} stage(s)"
    )
    for stage in recipe.stages:
        for group in stage.groups:
            for modifier in group.modifiers:
                start = _schedule(modifier.start, "calibration (post-training)")
                end = _schedule(modifier.end, "end of run")
                update = _schedule(modifier.update, "every event")
                print(
                    f"  [{modifier.index}] {stage.name}/{group.name}: {type(modifier).__name__}"
                    f"  start={start}  end={end}  update={update}"
                )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressor", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    recipe = commands.add_parser("recipe", help="work with recipe files")
    recipe_commands = recipe.add_subparsers(dest="recipe_command", required=True)
    check = recipe_commands.add_parser("check", help="validate a recipe and show its schedule")
    check.add_argument("file", help="path to a YAML recipe")
    check.set_defaults(handler=_recipe_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="INFO" if args.verbose else "WARNING")
    logger.enable("compressor")
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        print(f"compressor: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
