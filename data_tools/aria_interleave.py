"""Encode (audio, transcript) recordings into ARIA streams: text tokens and codec frames in one
interleaved sequence in which speech never runs ahead of the text by more than ``--lead`` frames.

    python -m data_tools.aria_interleave --input recordings.jsonl --output aria.jsonl \\
        [--codec embedded|CODEC_OR_TALKER_FOLDER] [--groups 4] [--codebook-size 256] [--frame-rate 50] \\
        [--tokenizer embedded|TOKENIZER_FOLDER] [--lead 4] [--slack 1.15] \\
        [--alignment asr|proportional] [--on-bad fail|skip] [--min-seconds 0.3] [--max-seconds 20]

Input rows: ``audio`` (path, relative to the input's folder), ``text`` (transcript), optional
``speaker`` and ``words`` (``[{word, start, end}]`` seconds; otherwise the packaged ASR's word
timestamps align the words). Output rows keep ``audio``, ``text``, ``speaker`` and add ``codes``
(``[groups][frames]``), ``word_frames`` (``[start, end)`` frames per word), ``codec`` (the
settings and codebook fingerprint the codes belong to) and ``stream`` (``[["text", token_id] |
["speech", frame], ...]``, checked on every prefix). ``OUTPUT.rates.json`` holds the
speech-to-text rate estimated per speaker (frames per text token x slack) and the pooled one.
``talker_pretrain data.path=aria.jsonl`` reads the output without re-encoding; codes made by a
different codec are refused there, naming the setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from posttrain.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.aria_interleave", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--input", required=True, help="jsonl of audio + text (+ speaker, words) rows")
    p.add_argument("--output", required=True, help="jsonl to write (plus OUTPUT.rates.json)")
    p.add_argument("--codec", default="embedded", help="'embedded' (mel RVQ, built and cached) or a codec folder / Talker folder")
    p.add_argument("--groups", type=int, default=4, help="embedded codec: codebooks per frame")
    p.add_argument("--codebook-size", type=int, default=256, help="embedded codec: entries per codebook")
    p.add_argument("--frame-rate", type=int, default=50, choices=[50, 25], help="embedded codec: frames per second")
    p.add_argument("--tokenizer", default="embedded", help="'embedded' (byte-level BPE learned from the transcripts) or a tokenizer folder")
    p.add_argument("--merges", type=int, default=400, help="embedded tokenizer: BPE merges")
    p.add_argument("--lead", type=int, default=4, help="frames speech may run ahead of the rate")
    p.add_argument("--slack", type=float, default=1.15, help="rate slack over the measured frames per text token")
    p.add_argument("--alignment", default="asr", choices=["asr", "proportional"], help="word times from ASR word timestamps or spread over the speech")
    p.add_argument("--language", default="en", help="language of the recordings, for the ASR")
    p.add_argument("--on-bad", default="fail", choices=["fail", "skip"], help="a bad recording stops the tool (fail) or is reported and left out (skip)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="shortest usable recording")
    p.add_argument("--max-seconds", type=float, default=20.0, help="longest usable recording")
    return p


def load_codec(spec: str, groups: int, codebook_size: int, frame_rate: int):
    """The embedded codec for these settings, or a saved one (a codec or Talker folder)."""
    from posttrain.errors import ModelError
    from posttrain.models.codec import MelRVQCodec, MelRVQConfig, embedded_codec
    from posttrain.models.hub import cache_root

    if spec == "embedded":
        return embedded_codec(cache_root(), MelRVQConfig(num_groups=groups, codebook_size=codebook_size, stack=1 if frame_rate == 50 else 2))
    folder = os.path.join(spec, "codec") if os.path.isdir(os.path.join(spec, "codec")) else spec
    if not os.path.isdir(folder):
        raise ModelError(f"--codec {spec!r}: not 'embedded' and not a codec or Talker folder")
    return MelRVQCodec.load(folder)


def interleave(rows_path: str, codec, tokenizer_spec: str = "embedded", merges: int = 400, lead: int = 4, slack: float = 1.15, **load_options):
    """(output rows, rates) for the recordings in ``rows_path``."""
    from posttrain.data.aria import build_stream, check_stream, estimate_rates
    from posttrain.data.speech_corpus import word_token_groups
    from posttrain.data.user_speech import codec_fingerprint, load_user_speech
    from posttrain.models.hub import cache_root

    speech = load_user_speech(rows_path, codec, cache_root(), **load_options)
    if tokenizer_spec == "embedded":
        from posttrain.models.tokenizer import build_embedded_tokenizer

        tokenizer = build_embedded_tokenizer([u.text for u in speech.utterances], num_merges=merges)
    else:
        from posttrain.models.qwen_omni import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_spec)
    groups = [word_token_groups(tokenizer, u.words) for u in speech.utterances]
    rates = estimate_rates([(speech.speakers[u.voice], sum(map(len, g)), u.codes.shape[1]) for u, g in zip(speech.utterances, groups)], slack=slack, lead=lead)
    fingerprint = codec_fingerprint(codec)
    by_line = {}
    from posttrain.data.io import load_rows

    for row in load_rows(rows_path):
        by_line[row["_line"]] = row
    out = []
    for u, g, line in zip(speech.utterances, groups, speech.lines):
        rate = rates.get(speech.speakers[u.voice], rates["*"])
        stream = build_stream(g, u.spans, u.codes.shape[1], rate)
        bad = check_stream(stream, sum(map(len, g)), rate)
        assert bad is None, f"line {line}: built stream breaks the rate at item {bad}"
        source = by_line.get(line, {})
        out.append({
            "audio": source.get("audio"), "text": u.text, "speaker": speech.speakers[u.voice],
            "codes": u.codes.tolist(), "word_frames": [list(s) for s in u.spans], "codec": fingerprint,
            "stream": [[kind, int(v)] for kind, v in stream],
        })
    return out, rates, speech


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 for bad input, with `error: ...` on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        from posttrain.data.io import write_jsonl

        codec = load_codec(args.codec, args.groups, args.codebook_size, args.frame_rate)
        rows, rates, speech = interleave(
            args.input, codec, args.tokenizer, args.merges, args.lead, args.slack,
            on_bad=args.on_bad, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
            alignment=args.alignment, asr_language=args.language,
        )
        write_jsonl(args.output, rows)
        rates_path = args.output + ".rates.json"
        tmp = rates_path + f".tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({k: {"frames_per_token": r.frames_per_token, "lead": r.lead} for k, r in rates.items()}, fh, indent=2)
        os.replace(tmp, rates_path)
        frames = sum(len(r["codes"][0]) for r in rows)
        print(
            f"wrote {len(rows)} ARIA streams ({frames / codec.frame_rate:.1f} s of speech, {len(speech.speakers)} speakers, "
            f"{len(speech.skipped)} rows skipped) to {args.output}; rates (frames per text token): "
            + ", ".join(f"{k} {r.frames_per_token:.2f}" for k, r in rates.items())
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
