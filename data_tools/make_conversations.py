"""Make multi-turn conversations for interaction RL (persona, language switching, long-range rules).

    python -m data_tools.make_conversations --output conversations.jsonl [--n 200] [--turns 4] \\
        [--languages en de fr es zh] [--long-context-chars 8000] [--user-data my_turns.jsonl] \\
        [--min-constraints 1] [--max-constraints 3] [--seed 0]

Each output line is one conversation in TRL's conversational format: ``prompt`` (system turn with
the persona card, user/assistant turns, ending with a user turn), plus ``persona``, ``language``,
``constraints``, ``turn_languages``, ``reference`` (a correct final reply), ``id``, ``num_turns``
and ``context_chars``; the rewards ``persona``, ``language`` and ``instruction_following`` read
these columns. See posttrain/data/conversations.py for the details.

``--user-data``: a jsonl of your own personas and/or user turns, one per line:
    {"persona": "Name: Ana Silva; Age: 30; City: Porto; Style: emoji=never"}
    {"messages": [{"role": "user", "content": "Ich plane eine Reise nach Wien."}], "language": "de"}
    {"turns": ["Tell me something about your town."]}
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from posttrain.data.conversations import (
    CONVERSATION_CONSTRAINTS,
    SUPPORTED_LANGUAGES,
    make_conversations,
    read_user_data,
)
from posttrain.errors import UserError


def _split(values: list[str] | None) -> list[str] | None:
    # Accept both "--languages en de" and "--languages en,de".
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.make_conversations",
        description="Make multi-turn conversations (TRL conversational format) with a persona card in the "
        "system turn, users who switch language, and rules stated in the first turn that must hold in the "
        "final reply; writes a jsonl with prompt, persona, language, constraints, reference, id, num_turns, "
        "context_chars.",
    )
    parser.add_argument("--output", "-o", required=True, help="output jsonl")
    parser.add_argument("--n", type=int, default=200, help="number of conversations (default: 200)")
    parser.add_argument("--turns", type=int, default=3, help="user turns per conversation, the last one to be "
                        "answered by the model (default: 3)")
    parser.add_argument("--languages", nargs="+", help=f"languages of the template turns (default: "
                        f"{' '.join(SUPPORTED_LANGUAGES)}; supported: {', '.join(SUPPORTED_LANGUAGES)})")
    parser.add_argument("--long-context-chars", "--min-chars", dest="long_context_chars", type=int,
                        help="pad earlier turns with story filler until each prompt holds at least this many "
                        "characters (default: no filler)")
    parser.add_argument("--user-data", help="jsonl of your own personas and/or user turns (see --help text above)")
    parser.add_argument("--constraint-types", nargs="+", help=f"constraint kinds to draw from (default: all of "
                        f"{' '.join(CONVERSATION_CONSTRAINTS)})")
    parser.add_argument("--min-constraints", type=int, default=1,
                        help="fewest constraints per conversation (default: 1)")
    parser.add_argument("--max-constraints", type=int, default=3,
                        help="most constraints per conversation (default: 3)")
    parser.add_argument("--switch-probability", type=float, default=0.5,
                        help="chance that a user turn switches language (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed (default: 0); conversation i depends only on (seed, i)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 for bad input, with `error: ...` on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        from posttrain.data.io import read_jsonl, write_jsonl

        personas, user_conversations = [], []
        if args.user_data:
            personas, user_conversations = read_user_data(read_jsonl(args.user_data), args.user_data)
        rows = make_conversations(
            args.n,
            turns=args.turns,
            seed=args.seed,
            languages=_split(args.languages) or SUPPORTED_LANGUAGES,
            long_context_chars=args.long_context_chars,
            personas=personas or None,
            user_conversations=user_conversations or None,
            constraint_types=_split(args.constraint_types) or CONVERSATION_CONSTRAINTS,
            min_constraints=args.min_constraints,
            max_constraints=args.max_constraints,
            switch_probability=args.switch_probability,
        )
        write_jsonl(args.output, rows)
        chars = [r["context_chars"] for r in rows]
        span = f", {min(chars)}-{max(chars)} characters of context" if chars else ""
        print(f"wrote {len(rows)} conversations of {args.turns} user turns to {args.output}{span}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
