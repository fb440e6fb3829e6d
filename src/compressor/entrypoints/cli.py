"""The ``compressor`` command line."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from loguru import logger

__all__ = ["main", "one_line"]


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
                for line in _resolved_fields(modifier):
                    print(f"      {line}")
    return 0


_SCHEDULE_FIELDS = ("index", "group", "start", "end", "update")


def _resolved_fields(modifier: Any) -> list[str]:
    """Every field the modifier will run with, defaults included, and for a quantizing
    modifier the scheme each config group resolves to (a preset spelled out)."""
    values = modifier.model_dump(mode="json", exclude=set(_SCHEDULE_FIELDS))
    lines = [
        f"{name}: {_flow(value)}"
        for name, value in values.items()
        if name != "config_groups" and value is not None  # unset options: nothing to show
    ]
    resolve = getattr(modifier, "resolve_quantization_config", None)
    if resolve is not None:
        config = resolve()
        for name, scheme in config.config_groups.items():
            lines.append(f"scheme {name}: targets {_flow(list(scheme.targets))}")
            for role in ("weights", "input_activations", "output_activations"):
                args = getattr(scheme, role)
                if args is not None:
                    resolved = args.model_dump(mode="json", exclude_none=True)
                    lines.append(f"  {role}: {_flow(resolved)}")
    return lines


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _recipe_convert(args: argparse.Namespace) -> int:
    from compressor.recipe import Recipe

    recipe = Recipe.from_deepspeed(Path(args.file))
    if args.output is None:
        print(recipe.to_yaml(), end="")
    else:
        recipe.save(Path(args.output))
        print(f"wrote {len(recipe.modifiers)} modifier(s) to {args.output}", file=sys.stderr)
    return 0


def _oneshot(args: argparse.Namespace) -> int:
    import time

    from compressor.entrypoints.oneshot import oneshot

    began = time.perf_counter()
    oneshot(
        args.model,  # strings read by oneshot's rules: paths, YAML text, Hub ids
        args.recipe,
        args.dataset,
        num_calibration_samples=args.num_samples,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size,
        pipeline=args.pipeline,
        output_dir=Path(args.output),
        save_compressed=not args.dense,
        overwrite=args.overwrite,
        device=args.device,
        offload_folder=args.offload_folder,
        decompress_after_save=False,  # the process ends after the save
    )
    print(f"saved the compressed model to {args.output} in {time.perf_counter() - began:.1f} s")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from compressor.calibration.data import read_text_file
    from compressor.entrypoints.loading import load_model, load_tokenizer
    from compressor.utils.eval import perplexity

    data = Path(args.data)
    if not data.is_file():
        raise FileNotFoundError(f"--data file not found: {data}")
    text = read_text_file(data)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"--model {args.model}: no tokenizer found beside the model")
    model = load_model(args.model, compressed_ok=True)  # evaluating a compressed checkpoint
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    ppl = perplexity(model, ids, window=args.window, max_windows=args.max_windows)
    windows = min(ids.numel() // args.window, args.max_windows or ids.numel())
    print(f"perplexity {ppl:.4f} over {windows} window(s) of {args.window} tokens of {data}")
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressor", description=__doc__)
    verbose_help = "log progress to stderr, and the traceback of a failure"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # also accepted after the command (``compressor oneshot ... --verbose``)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
    )
    commands = parser.add_subparsers(dest="command", required=True)

    recipe = commands.add_parser("recipe", help="work with recipe files", parents=[verbose])
    recipe_commands = recipe.add_subparsers(dest="recipe_command", required=True)
    check = recipe_commands.add_parser(
        "check", help="validate a recipe and show its schedule", parents=[verbose]
    )
    check.add_argument("file", help="path to a YAML recipe")
    check.set_defaults(handler=_recipe_check)
    convert = recipe_commands.add_parser(
        "convert", help="convert another tool's config to YAML", parents=[verbose]
    )
    convert.add_argument(
        "--from", dest="source", required=True, choices=["deepspeed"], help="the config's tool"
    )
    convert.add_argument("file", help="a DeepSpeed JSON config (with compression_training)")
    convert.add_argument("-o", "--output", help="write the YAML here instead of stdout")
    convert.set_defaults(handler=_recipe_convert)

    one = commands.add_parser(
        "oneshot", help="compress a model with a recipe after training", parents=[verbose]
    )
    one.add_argument(
        "--model", required=True, help="checkpoint directory, .gguf file or Hugging Face Hub id"
    )
    one.add_argument(
        "--recipe", required=True, help="path to a YAML recipe (or YAML text with a newline)"
    )
    one.add_argument(
        "--dataset",
        help="text, json, jsonl, csv or parquet file, dataset directory or Hub dataset id to "
        "calibrate on, or 'self' for text sampled from the model",
    )
    one.add_argument("--output", required=True, help="directory for the compressed checkpoint")
    one.add_argument("--num-samples", type=_positive, default=256, help="calibration sequences")
    one.add_argument("--max-seq-length", type=_positive, default=512, help="tokens per sequence")
    one.add_argument("--batch-size", type=_positive, default=1, help="sequences per forward")
    one.add_argument(
        "--pipeline", default="auto", choices=["auto", "datafree", "basic", "sequential"]
    )
    one.add_argument("--device", help="compute device of the sequential pipeline (e.g. cuda)")
    one.add_argument(
        "--offload-folder",
        help="load the decoder layers offloaded to disk here (a model larger than memory)",
    )
    one.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    one.add_argument("--dense", action="store_true", help="save dense rather than packed weights")
    one.set_defaults(handler=_oneshot)

    ev = commands.add_parser(
        "eval", help="perplexity of a model over fixed windows of a text", parents=[verbose]
    )
    ev.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    ev.add_argument("--data", required=True, help="a text file")
    ev.add_argument("--window", type=_positive, default=512, help="tokens per window")
    ev.add_argument("--max-windows", type=_positive, help="score only the first N windows")
    ev.set_defaults(handler=_eval)
    return parser


# failures that come from the input or the environment (exit status 2); any other is a
# failure of the run (exit status 1)
_INPUT_ERRORS = (ValueError, TypeError, KeyError, OSError)


def one_line(err: BaseException) -> str:
    """``err`` as one line that says what went wrong and, where the error alone does not,
    what to do.

    :param err: the exception
    :return: the line (without the ``compressor: error:`` prefix)
    """
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        parts = [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        ]
        return "; ".join(parts)
    if isinstance(err, RecursionError):
        return f"{err}: the input (recipe or model) is nested too deeply to process; simplify it"
    if isinstance(err, MemoryError):
        return (
            "out of memory: lower --num-samples, --max-seq-length or --batch-size, or load the "
            "model with --offload-folder"
        )
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError | FileExistsError):
        text += " (check the path and its permissions)"
    if not isinstance(err, _INPUT_ERRORS):
        text = f"{type(err).__name__}: {text} (rerun with --verbose for the traceback)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; every failure is one line on stderr (the traceback too with
    ``--verbose``), exit status 2 for bad input or environment, 1 for a failed run, 130 when
    interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="INFO" if args.verbose else "WARNING")
    logger.enable("compressor")
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("compressor: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.verbose:
            traceback.print_exception(err, file=sys.stderr)
        print(f"compressor: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, _INPUT_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
