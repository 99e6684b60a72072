"""The ``posttrain`` command: run recipes, list them, try reward plugins.

    posttrain list
    posttrain run NAME [key=value ...]      (``--help`` after NAME lists every key)
    posttrain rewards list
    posttrain rewards score --reward NAME --data FILE [--output FILE]

User errors (a config key, a data line, a path) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from posttrain.errors import UserError


def _print_recipe_help(name: str) -> None:
    from posttrain.config import describe, load_config
    from recipes import defaults_path, load_recipe, purpose

    module = load_recipe(name)
    cfg = load_config(module.Config, defaults_path(name), [])
    print(f"posttrain run {name} [key=value ...]\n\n{purpose(module)}\n")
    print("Keys (current default, then what it does); nested keys use dots, e.g. optim.lr=1e-3.")
    print("config=FILE.yaml applies a YAML of your own on top of the defaults.\n")
    for key, tp, default, help_text in describe(cfg):
        print(f"  {key} = {default}   ({tp})")
        if help_text:
            print(textwrap.indent(textwrap.fill(help_text, 88), "      "))


def cmd_list(_args) -> int:
    from recipes import load_recipe, purpose, recipe_names

    names = recipe_names()
    width = max(len(n) for n in names) if names else 0
    for name in names:
        print(f"{name:<{width}}  {purpose(load_recipe(name))}")
    return 0


def cmd_run(args) -> int:
    from posttrain.config import load_config
    from recipes import defaults_path, load_recipe

    if args.help or not args.recipe:
        if not args.recipe:
            print("usage: posttrain run NAME [key=value ...]; `posttrain list` shows the recipes")
            return 0 if args.help else 2
        _print_recipe_help(args.recipe)
        return 0
    module = load_recipe(args.recipe)
    cfg = load_config(module.Config, defaults_path(args.recipe), args.overrides)
    module.run(cfg)
    return 0


def cmd_rewards(args) -> int:
    from posttrain import reward_tools

    if args.rewards_cmd == "list":
        return reward_tools.list_rewards()
    if args.rewards_cmd == "score":
        return reward_tools.score_file(args.reward, args.data, args.output, args.params)
    print("usage: posttrain rewards {list,score}")
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="list recipes with their purpose").set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="run a recipe", add_help=False)
    run.add_argument("recipe", nargs="?")
    run.add_argument("overrides", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)
    rewards = sub.add_parser("rewards", help="list or try reward plugins")
    rsub = rewards.add_subparsers(dest="rewards_cmd")
    rsub.add_parser("list", help="every registered reward with its summary")
    score = rsub.add_parser("score", help="score a jsonl of samples with one reward")
    score.add_argument("--reward", required=True, help="entry-point name or module:function")
    score.add_argument("--data", required=True, help="jsonl with prompt, completion, and other columns")
    score.add_argument("--output", help="write per-sample scores to this jsonl")
    score.add_argument("--param", dest="params", action="append", default=[], help="key=value bound to the reward")
    rewards.set_defaults(func=cmd_rewards)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        # `run NAME --help` anywhere after the name asks for that recipe's keys
        args.help = args.recipe in ("-h", "--help") or any(o in ("-h", "--help") for o in args.overrides)
        if args.recipe in ("-h", "--help"):
            args.recipe = None
        args.overrides = [o for o in args.overrides if o not in ("-h", "--help")]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; continue later with resume=true", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
