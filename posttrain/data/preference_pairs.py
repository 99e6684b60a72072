"""Preference pairs of Talker speech ranked by rule-based rewards on the decoded waveform.

For each (text, voice) prompt the Talker samples ``n`` candidates; the configured rewards
(default ``wer`` + ``prosody``) score what a listener hears; when the best and the worst
candidate differ by at least ``margin`` they become a pair (chosen = best, rejected = worst).
Pairs keep the codec codes, the ARIA stream, how each candidate ended and every reward, so
they can be inspected, saved as jsonl and trained on later without sampling again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data.io import load_rows, write_jsonl
from posttrain.errors import DataError
from posttrain.rollout.speech import SpeechCompletion, SpeechRequest, score_completions


@dataclass
class Candidate:
    codes: torch.Tensor
    stream: list
    ended: bool
    reward: float
    rewards: dict

    def to_json(self) -> dict:
        return {
            "codes": self.codes.tolist(), "stream": [[k, int(v)] for k, v in self.stream], "ended": self.ended,
            "reward": self.reward, "rewards": self.rewards,
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Candidate":
        try:
            codes = torch.tensor(d["codes"], dtype=torch.long)
            stream = [(str(k), int(v)) for k, v in d["stream"]]
            return cls(codes, stream, bool(d.get("ended", True)), float(d.get("reward", 0.0)), dict(d.get("rewards", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: malformed candidate ({type(e).__name__}: {e}); rebuild the pairs with build_preference_pairs") from None


@dataclass
class PreferencePair:
    text: str
    voice: str
    chosen: Candidate
    rejected: Candidate

    @property
    def margin(self) -> float:
        return self.chosen.reward - self.rejected.reward

    def to_json(self) -> dict:
        return {"text": self.text, "voice": self.voice, "margin": self.margin, "chosen": self.chosen.to_json(), "rejected": self.rejected.to_json()}


def build_pairs(engine, rewards, prompts: list[tuple[str, str]], n: int = 4, temperature: float = 1.0, margin: float = 0.1,
                seed: int = 0, columns_of=None, progress: bool = True, code_temperature: float | None = None) -> tuple[list[PreferencePair], dict]:
    """Pairs from ``n`` sampled candidates per ``(text, voice)`` prompt and statistics
    (``candidates``, ``pairs``, mean best / worst reward). ``columns_of(completions)`` may add
    reward columns (e.g. ``reference_audio`` for speaker similarity). ``code_temperature``: the
    code predictor's (residual codebooks); ``None`` samples them at ``temperature``, 0 takes its
    most likely codes."""
    from tqdm.auto import tqdm

    if n < 2:
        raise DataError("preference pairs need at least 2 candidates per prompt (n >= 2)")
    pairs: list[PreferencePair] = []
    best, worst, kept_margins = [], [], []
    chunk = max(1, engine.batch_size // n) if hasattr(engine, "batch_size") else 4
    bar = tqdm(range(0, len(prompts), chunk), desc="sampling candidates for pairs", disable=not progress, leave=False)
    for start in bar:
        group = prompts[start : start + chunk]
        requests = [SpeechRequest(text, voice, temperature, request_id=(start + p, k), code_temperature=code_temperature) for p, (text, voice) in enumerate(group) for k in range(n)]
        completions: list[SpeechCompletion] = engine.generate(requests, seed=seed + start)
        extra = columns_of(completions) if columns_of else {}
        combined, per = score_completions(rewards, completions, **extra)
        for p, (text, voice) in enumerate(group):
            idx = list(range(p * n, (p + 1) * n))
            scores = [combined[i] for i in idx]
            hi = idx[max(range(n), key=lambda k: scores[k])]
            lo = idx[min(range(n), key=lambda k: scores[k])]
            best.append(combined[hi])
            worst.append(combined[lo])
            if combined[hi] - combined[lo] >= margin:
                kept_margins.append(combined[hi] - combined[lo])
                pairs.append(PreferencePair(
                    text, completions[hi].voice,
                    _candidate(completions[hi], combined[hi], {k: v[hi] for k, v in per.items()}),
                    _candidate(completions[lo], combined[lo], {k: v[lo] for k, v in per.items()}),
                ))
        bar.set_postfix(pairs=len(pairs), refresh=False)
    stats = {
        "prompts": len(prompts), "candidates": len(prompts) * n, "pairs": len(pairs),
        "best_reward": sum(best) / max(1, len(best)), "worst_reward": sum(worst) / max(1, len(worst)),
        "mean_margin": sum(kept_margins) / max(1, len(kept_margins)),
    }
    return pairs, stats


def _candidate(c: SpeechCompletion, reward: float, rewards: dict) -> Candidate:
    return Candidate(c.codes, c.stream, c.ended, reward, rewards)


def save_pairs(path: str, pairs: list[PreferencePair]) -> None:
    write_jsonl(path, [p.to_json() for p in pairs])


def load_pairs(path: str, voices: list[str] | None = None) -> list[PreferencePair]:
    """Pairs saved by `save_pairs`; a malformed line or an unknown voice is named."""
    out = []
    for row in load_rows(path):
        where = f"{path}, line {row.get('_line', '?')}"
        for key in ("text", "voice", "chosen", "rejected"):
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}; rebuild the pairs with build_preference_pairs")
        if voices is not None and row["voice"] not in voices:
            raise DataError(f"{where}: voice {row['voice']!r} is not one of this Talker's voices ({', '.join(voices)})")
        out.append(PreferencePair(row["text"], row["voice"], Candidate.from_json(row["chosen"], where), Candidate.from_json(row["rejected"], where)))
    return out
