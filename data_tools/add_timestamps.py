"""Lay out Qwen3-Omni-style timestamp marks (``<12.0 seconds>``) for audio clips.

    python -m data_tools.add_timestamps --input spoken.jsonl --output timestamped.jsonl \\
        [--tokens-per-second 13] [--every-seconds 2] [--max-offset-seconds 0] [--seed 0]

Each input row needs ``num_tokens`` (encoder tokens of the clip) or ``audio`` (a file path,
relative to the input jsonl's folder; its duration gives the token count: Qwen3-Omni's exact
encoder count at the default 13 tokens/s, otherwise ceil(duration x rate)). The output keeps
every field and adds ``num_tokens``, ``timestamp_offset`` (seconds) and ``timestamps``: a list of
``{"token_index", "seconds", "text"}``, each mark going right before that audio token.

``--max-offset-seconds 0`` (the default) gives the evaluation layout (offset 0). A positive
value gives a training layout: each row's offset is drawn uniformly from [0, max) by a generator
seeded with (seed, row index), so reruns reproduce it. See posttrain/data/timestamps.py for the
rules; the Thinker's collator calls the same library at training time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from posttrain.data.timestamps import (
    DEFAULT_EVERY_SECONDS,
    QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND,
    num_tokens_of,
    sample_offset,
    timestamp_layout,
)
from posttrain.errors import UserError


def add_timestamps(
    rows: Sequence[dict],
    tokens_per_second: float = QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND,
    every_seconds: float = DEFAULT_EVERY_SECONDS,
    max_offset_seconds: float = 0.0,
    seed: int = 0,
    align: int = 1,
    audio_base: str | None = None,
    source: str = "rows",
) -> list[dict]:
    """Rows with ``num_tokens``, ``timestamp_offset`` and ``timestamps`` added (see the module
    docstring). ``audio_base`` is the folder relative ``audio`` paths are read from."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}, line {row['_line']}" if "_line" in row else f"{source}, row {i + 1}"
        num_tokens = num_tokens_of(row, where, audio_base, tokens_per_second)
        offset = sample_offset(f"timestamps-{seed}-{i}", max_offset_seconds)
        new = {k: v for k, v in row.items() if not k.startswith("_")}
        new["num_tokens"] = num_tokens
        new["timestamp_offset"] = round(offset, 6)
        new["timestamps"] = timestamp_layout(num_tokens, tokens_per_second, every_seconds, offset, align)
        out.append(new)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.add_timestamps",
        description="Add Qwen3-Omni-style timestamp marks (<X.Y seconds>) to a jsonl of audio clips: "
        "each row needs num_tokens or an audio path; the output adds num_tokens, timestamp_offset and "
        "timestamps [{token_index, seconds, text}].",
    )
    parser.add_argument("--input", "-i", required=True, help="input jsonl with 'audio' (path) or 'num_tokens'")
    parser.add_argument("--output", "-o", required=True, help="output jsonl")
    parser.add_argument("--tokens-per-second", type=float, default=QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND,
                        help=f"encoder tokens per second of audio (default: {QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND}, "
                        "Qwen3-Omni's audio encoder; for video: frames/s x tokens per frame)")
    parser.add_argument("--every-seconds", type=float, default=DEFAULT_EVERY_SECONDS,
                        help=f"seconds between marks (default: {DEFAULT_EVERY_SECONDS})")
    parser.add_argument("--max-offset-seconds", type=float, default=0.0,
                        help="training: draw each clip's start offset from [0, this); 0 (default) = evaluation layout")
    parser.add_argument("--align", type=int, default=1, help="put marks only between groups of this many tokens "
                        "(video: tokens per frame; default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the offsets (default: 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 for bad input, with `error: ...` on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        from posttrain.data.io import read_jsonl, write_jsonl

        rows = read_jsonl(args.input)
        out = add_timestamps(rows, args.tokens_per_second, args.every_seconds, args.max_offset_seconds,
                             args.seed, args.align, os.path.dirname(os.path.abspath(args.input)), args.input)
        write_jsonl(args.output, out)
        marks = sum(len(r["timestamps"]) for r in out)
        print(f"wrote {len(out)} rows with {marks} timestamp marks to {args.output}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
