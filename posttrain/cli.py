"""The ``posttrain`` command: run recipes, list them, try reward plugins.

    posttrain list
    posttrain run NAME [key=value ...]      (``--help`` after NAME lists every key)
    posttrain rewards list
    posttrain rewards score --reward NAME --data FILE [--output FILE]
    posttrain eval tts --talker PATH [--sentences FILE]

User errors (a config key, a data line, a path) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import textwrap

from posttrain.errors import RolloutTimeoutError, UserError


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
    from posttrain.distributed import check_recipe_supports
    from recipes import defaults_path, load_recipe

    if args.help or not args.recipe:
        if not args.recipe:
            print("usage: posttrain run NAME [key=value ...]; `posttrain list` shows the recipes")
            return 0 if args.help else 2
        _print_recipe_help(args.recipe)
        return 0
    module = load_recipe(args.recipe)
    cfg = load_config(module.Config, defaults_path(args.recipe), args.overrides)
    from posttrain.models import hub

    hub.allow_remote_code(cfg.trust_remote_code)  # only what the user wrote enables it
    check_recipe_supports(args.recipe, cfg)
    module.run(cfg)
    return 0


def cmd_rewards(args) -> int:
    from posttrain import reward_tools

    if args.rewards_cmd == "list":
        return reward_tools.list_rewards()
    if args.rewards_cmd == "score":
        return reward_tools.score_file(args.reward, args.data, args.output, args.params, args.timeout)
    print("usage: posttrain rewards {list,score}")
    return 2


def cmd_eval(args) -> int:
    """``posttrain eval tts``: a Talker speaks a list of sentences; ASR, speaker encoder and
    Praat judge it; a markdown + json table and example wavs are written."""
    import random

    from posttrain.errors import DataError
    from posttrain.eval_tts import format_summary, score_speech, write_report
    from posttrain.logging import quiet_libraries
    from posttrain.talker import load_bundle, speak, voice_reference_embeddings

    if args.eval_cmd != "tts":
        print("usage: posttrain eval tts --talker PATH [--sentences FILE] [--voice NAME] [--output DIR]")
        return 2
    quiet_libraries()
    bundle = load_bundle(args.talker)
    if args.sentences:
        if not os.path.exists(args.sentences):
            raise DataError(f"sentences file {args.sentences!r} does not exist")
        with open(args.sentences, encoding="utf-8") as fh:
            sentences = [line.strip() for line in fh if line.strip()]
        if not sentences:
            raise DataError(f"{args.sentences}: no sentences (one per line)")
    elif bundle.held_out:  # sentences the Talker never trained on
        sentences = [t for t, _ in bundle.held_out][: args.n]
    else:
        from posttrain.data.speech_corpus import make_sentence

        rng = random.Random(12345)
        sentences = [make_sentence(rng) for _ in range(args.n)]
    references = voice_reference_embeddings(bundle.voices)
    if args.voice and args.voice not in bundle.voices:  # a fine-tuned voice adapter, by name or path
        import numpy as np

        from posttrain.voices import apply_voice, voice_path

        apply_voice(bundle, args.talker, args.voice)
        name = bundle.voices[-1] if args.voice not in bundle.voices else args.voice
        references[name] = np.load(os.path.join(voice_path(args.voice), "reference.npy"))
        voices = [name]
    else:
        voices = [args.voice] if args.voice else bundle.voices
    samples = [speak(bundle, text, voices[i % len(voices)]) for i, text in enumerate(sentences)]
    rows, summary = score_speech(samples, references)
    out = args.output or os.path.join(args.talker, "..", "eval_tts")
    path = write_report(out, rows, summary, samples)
    with open(path, encoding="utf-8") as fh:
        print(fh.read())
    print(format_summary(summary))
    print(f"written to {os.path.normpath(out)}")
    return 0


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
    score.add_argument("--timeout", type=float, default=600.0, help="seconds the reward may take on the whole file (0 = no limit)")
    rewards.set_defaults(func=cmd_rewards)
    ev = sub.add_parser("eval", help="evaluate a trained model")
    esub = ev.add_subparsers(dest="eval_cmd")
    tts = esub.add_parser("tts", help="Seed-TTS-eval style: WER by ASR, speaker similarity, F0 range, RTF, first-packet latency")
    tts.add_argument("--talker", required=True, help="a Talker folder (the 'talker' folder of a talker_pretrain run)")
    tts.add_argument("--sentences", help="a text file, one sentence per line (default: held-out sentences of the embedded grammar)")
    tts.add_argument("--n", type=int, default=10, help="how many default sentences")
    tts.add_argument("--voice", help="speak every sentence in this voice: one of the Talker's, or a voice adapter from talker_speaker_ft (name or folder); default: cycle through the Talker's voices")
    tts.add_argument("--output", help="folder for the table and example wavs")
    ev.set_defaults(func=cmd_eval)
    return parser


#: Nothing is downloaded at run time: models and datasets come from local folders or the
#: local Hugging Face cache. A user who wants the hub sets these to 0 explicitly.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

#: Faults of the machine rather than of posttrain: reported in one line, like user errors.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full; free space or set output_dir on another disk",
    errno.EDQUOT: "the disk quota is exhausted; free space or set output_dir on another disk",
    errno.EROFS: "the file system is read-only; set output_dir to a writable folder",
    errno.EACCES: "permission denied; set output_dir (or the named path) to one you may write",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in OFFLINE_ENV:
        os.environ.setdefault(name, "1")
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
    except RolloutTimeoutError as e:
        print(f"error: {e}; a run stopped this way continues from its last complete checkpoint with resume=true", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head`
        return 0
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {_ENVIRONMENT_ERRNOS[e.errno]}{where}; a run stopped this way continues from its "
              "last complete checkpoint with resume=true", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; continue later with resume=true", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
