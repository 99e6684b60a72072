"""Build preference pairs of Talker speech ranked by rule-based rewards on the decoded waveform.

    python -m data_tools.build_preference_pairs --talker runs/talker_pretrain/<time>/talker \\
        --output pairs.jsonl [--sentences sentences.txt | --prompts N] [--candidates 4] \\
        [--temperature 1.0] [--margin 0.1] [--reward wer=1.0 --reward prosody=0.5] [--seed 0]

For each (sentence, voice) prompt the Talker samples ``--candidates`` utterances (ARIA
constraint on), the codec decodes them and the rewards score what the ASR, Praat and the
speaker encoder hear. The best and the worst candidate become a pair when their combined
reward differs by at least ``--margin``. Each output row holds ``text``, ``voice``, ``margin``
and ``chosen`` / ``rejected`` with ``codes`` ([groups][frames]), the ARIA ``stream``,
``ended`` (EOS or frame cap), ``reward`` and every reward's value; ``talker_dpo
pairs.path=pairs.jsonl`` trains on them.

``--sentences`` is a text file (one sentence per line, optionally ``sentence<TAB>voice``);
without it, ``--prompts`` new sentences of the embedded grammar in the Talker's voices.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from posttrain.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.build_preference_pairs", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--talker", required=True, help="a Talker folder (the 'talker' folder of a talker_pretrain / talker_dpo run)")
    p.add_argument("--output", required=True, help="jsonl of pairs to write")
    p.add_argument("--sentences", default="", help="text file: one sentence per line (optionally sentence<TAB>voice)")
    p.add_argument("--prompts", type=int, default=64, help="without --sentences: this many new sentences of the embedded grammar")
    p.add_argument("--candidates", type=int, default=4, help="candidates sampled per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--greedy-residual-codes", action="store_true", help="the code predictor takes its most likely residual codes (candidates differ only in codebook 0, READ and EOS)")
    p.add_argument("--margin", type=float, default=0.1, help="keep a pair when best - worst reward >= margin")
    p.add_argument("--reward", action="append", default=[], metavar="NAME=WEIGHT", help="a reward and its weight (repeatable; default wer=1.0 prosody=0.5)")
    p.add_argument("--batch", type=int, default=32, help="utterances generated together")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p


def parse_rewards(items: list[str]):
    from posttrain.config import RewardConfig

    if not items:
        return [RewardConfig("wer", 1.0), RewardConfig("prosody", 0.5)]
    out = []
    for item in items:
        name, _, weight = item.partition("=")
        try:
            out.append(RewardConfig(name.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise UserError(f"--reward {item!r}: the weight must be a number (NAME=WEIGHT, e.g. wer=1.0)") from None
    return out


def read_sentences(path: str, voices: list[str]) -> list[tuple[str, str]]:
    from posttrain.errors import DataError

    if not os.path.exists(path):
        raise DataError(f"--sentences {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            text, _, voice = line.partition("\t")
            voice = voice.strip() or voices[len(out) % len(voices)]
            if voice not in voices:
                raise DataError(f"{path}, line {lineno}: voice {voice!r} is not one of the Talker's voices ({', '.join(voices)})")
            out.append((" ".join(text.split()), voice))
    if not out:
        raise DataError(f"{path}: no sentences")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 for bad input, with `error: ...` on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        from posttrain.data.preference_pairs import build_pairs, save_pairs
        from posttrain.logging import quiet_libraries
        from posttrain.registry import RewardSet
        from posttrain.rollout.speech import TalkerEngine
        from posttrain.talker import load_bundle
        from recipes._talker_stage import training_prompts

        quiet_libraries()
        if args.candidates < 2:
            raise UserError("--candidates must be at least 2 (a pair needs a best and a worst)")
        rewards = RewardSet(parse_rewards(args.reward))
        bundle = load_bundle(args.talker)
        prompts = read_sentences(args.sentences, bundle.voices) if args.sentences else training_prompts(bundle, args.prompts, args.seed, salt="build_preference_pairs")
        engine = TalkerEngine(bundle, batch_size=args.batch)
        pairs, stats = build_pairs(engine, rewards, prompts, args.candidates, args.temperature, args.margin, seed=args.seed,
                                   code_temperature=0.0 if args.greedy_residual_codes else None)
        save_pairs(args.output, pairs)
        print(f"wrote {stats['pairs']} pairs from {stats['prompts']} prompts x {args.candidates} candidates to {args.output}; "
              f"mean best reward {stats['best_reward']:.3f}, worst {stats['worst_reward']:.3f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
