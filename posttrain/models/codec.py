"""Speech codecs behind one interface: ``encode(wavs) -> codes [batch, groups, frames]`` and
``decode(codes) -> wavs``, streaming-capable (``decode_stream`` yields audio chunk by chunk).
The caller knows ``frame_rate``, ``num_groups`` and ``codebook_size``.

Two implementations:

- `MelRVQCodec`, the embedded one: residual vector quantisation of log-mel frames (one
  k-means codebook per residual stage), decoded by inverting the mel filterbank and
  Griffin-Lim phase reconstruction. Built offline from espeak-ng speech in about a minute
  and cached; a real ASR model hears its output (the round trip keeps WER within ~0.1 of the
  original audio at 50 Hz with 16 codebooks).
- `Code2WavCodec`, the real one: Qwen3-Omni's Code2Wav through the model adapter, decode
  only, as in the full model (codes come from the Talker and code predictor).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from posttrain.errors import ModelError, UserError


class Codec(ABC):
    """Waveform <-> discrete codes ``[batch, groups, frames]``."""

    sample_rate: int
    frame_rate: float
    num_groups: int
    codebook_size: int

    @abstractmethod
    def encode(self, wavs: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Codes ``[groups, frames]`` per waveform (16 kHz mono float32)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> list[np.ndarray]:
        """Waveforms for codes ``[batch, groups, frames]`` (or one ``[groups, frames]``)."""

    def decode_stream(self, codes: torch.Tensor, chunk_frames: int = 25, context_frames: int = 4) -> Iterator[np.ndarray]:
        """Decode ``[groups, frames]`` chunk by chunk, each chunk decoded with a little left
        context so the joins are smooth; yields waveform pieces as soon as each is ready."""
        if codes.dim() == 3:
            codes = codes[0]
        total = codes.shape[-1]
        hop = self.samples_per_frame
        for start in range(0, total, chunk_frames):
            left = max(0, start - context_frames)
            end = min(total, start + chunk_frames)
            wav = self.decode(codes[:, left:end].unsqueeze(0))[0]
            yield wav[(start - left) * hop : (end - left) * hop]

    @property
    def samples_per_frame(self) -> int:
        return int(round(self.sample_rate / self.frame_rate))

    def check_codes(self, codes: torch.Tensor, where: str = "codes") -> None:
        """Codes that do not fit this codec are a config mismatch, named clearly."""
        if codes.dim() not in (2, 3) or codes.shape[-2] != self.num_groups:
            raise UserError(
                f"{where}: codes of shape {tuple(codes.shape)} do not fit this codec ({self.num_groups} groups); "
                "the checkpoint and its data were made with different codec settings (codec.groups)"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise UserError(
                f"{where}: code values {int(codes.min())}..{int(codes.max())} outside the codebook size "
                f"{self.codebook_size}; the checkpoint and its data were made with different codec settings (codec.codebook_size)"
            )


# ---------------------------------------------------------------------------------------
# The embedded codec: mel RVQ + Griffin-Lim


@dataclass
class MelRVQConfig:
    """Settings of the embedded codec (all configurable; defaults measured to keep ASR WER)."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 320  # 50 frames per second
    n_mels: int = 80
    stack: int = 1  # mel frames per codec frame (2 -> 25 Hz)
    num_groups: int = 16
    codebook_size: int = 256
    kmeans_iters: int = 12
    griffin_lim_iters: int = 32
    fmin: float = 0.0
    fmax: float = 8000.0


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Centroids ``[k, dim]`` of ``x [n, dim]`` by Lloyd's algorithm with k-means++ seeding."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n <= k:
        extra = x[torch.randint(0, n, (k - n,), generator=g)] + 1e-3 * torch.randn(k - n, x.shape[1], generator=g)
        return torch.cat([x, extra])
    centroids = x[torch.randint(0, n, (1,), generator=g)]
    # k-means++ on a sample keeps seeding cheap
    sample = x[torch.randperm(n, generator=g)[: min(n, 20 * k)]]
    d2 = torch.cdist(sample, centroids).squeeze(1) ** 2
    for _ in range(1, k):
        probs = d2 / d2.sum().clamp_min(1e-12)
        nxt = sample[torch.multinomial(probs, 1, generator=g)]
        centroids = torch.cat([centroids, nxt])
        d2 = torch.minimum(d2, (torch.cdist(sample, nxt).squeeze(1)) ** 2)
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).float()
        empty = counts.squeeze(1) == 0
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if empty.any():  # re-seed dead centroids on random points
            centroids[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=g)]
    return centroids


class MelRVQCodec(Codec):
    """Residual VQ of (stacked) log-mel frames; Griffin-Lim decoding."""

    def __init__(self, config: MelRVQConfig, codebooks: torch.Tensor | None = None, mean: torch.Tensor | None = None):
        import librosa

        self.config = config
        self.sample_rate = config.sample_rate
        self.frame_rate = config.sample_rate / config.hop_length / config.stack
        self.num_groups = config.num_groups
        self.codebook_size = config.codebook_size
        mel = librosa.filters.mel(sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels, fmin=config.fmin, fmax=config.fmax)
        self.mel_basis = torch.tensor(mel, dtype=torch.float32)  # [n_mels, n_fft/2+1]
        self.mel_pinv = torch.linalg.pinv(self.mel_basis)
        self.window = torch.hann_window(config.n_fft)
        self.codebooks = codebooks  # [groups, K, dim]
        self.mean = mean if mean is not None else torch.zeros(config.n_mels * config.stack)

    @property
    def samples_per_frame(self) -> int:
        return self.config.hop_length * self.config.stack

    # -- features ------------------------------------------------------------------------

    def log_mel(self, wav: np.ndarray) -> torch.Tensor:
        """Stacked log-mel frames ``[frames, n_mels * stack]``."""
        c = self.config
        if len(wav) < max(c.n_fft // 2 + 1, self.samples_per_frame):
            raise UserError(f"audio of {len(wav) / c.sample_rate:.3f} s is too short for the codec (at least {c.n_fft / 2 / c.sample_rate * 1000:.0f} ms)")
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
        spec = torch.stft(x, c.n_fft, c.hop_length, window=self.window, center=True, return_complex=True).abs() ** 2
        mel = torch.log(torch.clamp(self.mel_basis @ spec, min=1e-5)).T  # [frames, n_mels]
        frames = mel.shape[0] // c.stack * c.stack
        if frames == 0:
            raise UserError(f"audio of {len(wav) / c.sample_rate:.3f} s is too short for the codec (one frame is {self.samples_per_frame / c.sample_rate * 1000:.0f} ms)")
        return mel[:frames].reshape(frames // c.stack, c.n_mels * c.stack)

    def mel_to_wav(self, log_mel: torch.Tensor) -> np.ndarray:
        """Griffin-Lim from unstacked log-mel ``[frames, n_mels]``."""
        c = self.config
        power = torch.exp(log_mel.T)  # [n_mels, frames]
        linear = torch.clamp(self.mel_pinv @ power, min=1e-10).sqrt()  # magnitude [freq, frames]
        angles = torch.exp(2j * math.pi * torch.rand(linear.shape, generator=torch.Generator().manual_seed(0)))
        spec = linear * angles
        length = linear.shape[1] * c.hop_length
        for _ in range(c.griffin_lim_iters):
            wav = torch.istft(spec, c.n_fft, c.hop_length, window=self.window, center=True, length=length)
            rebuilt = torch.stft(wav, c.n_fft, c.hop_length, window=self.window, center=True, return_complex=True)
            spec = linear * torch.exp(1j * torch.angle(rebuilt[:, : linear.shape[1]]))
        wav = torch.istft(spec, c.n_fft, c.hop_length, window=self.window, center=True, length=length)
        peak = wav.abs().max().clamp_min(1e-6)
        return (wav / peak * 0.9).numpy().astype(np.float32) if peak > 0.9 else wav.numpy().astype(np.float32)

    # -- training ------------------------------------------------------------------------

    def fit(self, wavs: Sequence[np.ndarray], seed: int = 0, max_frames: int = 60_000) -> "MelRVQCodec":
        """Learn the residual codebooks from speech: one k-means per stage on what the earlier
        stages left unexplained."""
        feats = torch.cat([self.log_mel(w) for w in wavs])
        g = torch.Generator().manual_seed(seed)
        if feats.shape[0] > max_frames:
            feats = feats[torch.randperm(feats.shape[0], generator=g)[:max_frames]]
        self.mean = feats.mean(0)
        residual = feats - self.mean
        books = []
        for stage in range(self.config.num_groups):
            centroids = kmeans(residual, self.config.codebook_size, self.config.kmeans_iters, seed=seed * 1000 + stage)
            books.append(centroids)
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(1)]
        self.codebooks = torch.stack(books)
        return self

    # -- the interface -------------------------------------------------------------------

    def _require_codebooks(self) -> None:
        if self.codebooks is None:
            raise ModelError("the mel RVQ codec has no codebooks; fit() it or load a trained one")

    def encode(self, wavs: Sequence[np.ndarray]) -> list[torch.Tensor]:
        self._require_codebooks()
        out = []
        for wav in wavs:
            residual = self.log_mel(wav) - self.mean
            codes = []
            for book in self.codebooks:
                idx = torch.cdist(residual, book).argmin(1)
                codes.append(idx)
                residual = residual - book[idx]
            out.append(torch.stack(codes))  # [groups, frames]
        return out

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Stacked log-mel frames ``[frames, dim]`` for codes ``[groups, frames]``."""
        self._require_codebooks()
        feats = self.mean.expand(codes.shape[-1], -1).clone()
        for g in range(codes.shape[0]):
            feats = feats + self.codebooks[g][codes[g]]
        return feats

    def decode(self, codes: torch.Tensor) -> list[np.ndarray]:
        if codes.dim() == 2:
            codes = codes.unsqueeze(0)
        self.check_codes(codes)
        c = self.config
        out = []
        for row in codes:
            stacked = self.dequantize(row.long())
            mel = stacked.reshape(-1, c.n_mels)  # unstack
            out.append(self.mel_to_wav(mel))
        return out

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Save codebooks (safetensors) and config (json) atomically."""
        from safetensors.torch import save_file

        self._require_codebooks()
        tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({"codebooks": self.codebooks.contiguous(), "mean": self.mean.contiguous()}, os.path.join(tmp, "codec.safetensors"))
        with open(os.path.join(tmp, "codec.json"), "w") as fh:
            json.dump({"type": "mel_rvq", **asdict(self.config)}, fh, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "MelRVQCodec":
        from safetensors.torch import load_file

        try:
            with open(os.path.join(path, "codec.json")) as fh:
                meta = json.load(fh)
            tensors = load_file(os.path.join(path, "codec.safetensors"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot load a codec from {path!r}: {e}") from None
        meta.pop("type", None)
        return cls(MelRVQConfig(**meta), tensors["codebooks"], tensors["mean"])


# ---------------------------------------------------------------------------------------
# The real codec: Qwen3-Omni Code2Wav (decode only)


class Code2WavCodec(Codec):
    """Qwen3-Omni's Code2Wav as a codec: decodes ``[batch, groups, frames]`` Talker codes
    (24 kHz at full size; 12.5 codec frames per second). It cannot encode: in the full model
    codes come from the Talker, never from audio."""

    def __init__(self, code2wav, sample_rate: int = 24000, frame_rate: float = 12.5):
        self.model = code2wav.eval()
        self.num_groups = code2wav.config.num_quantizers
        self.codebook_size = code2wav.config.codebook_size
        self.sample_rate = sample_rate
        self.frame_rate = frame_rate

    def encode(self, wavs):
        raise ModelError("Code2Wav only decodes, as in Qwen3-Omni: Talker codes come from the Talker and its code "
                         "predictor; to encode speech (e.g. training data) use the embedded codec")

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> list[np.ndarray]:
        if codes.dim() == 2:
            codes = codes.unsqueeze(0)
        self.check_codes(codes)
        wav = self.model(codes.long())
        return [w.reshape(-1).float().numpy() for w in wav]


# ---------------------------------------------------------------------------------------
# The embedded codec, built once from espeak-ng speech

CODEC_SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "please call stella and ask her to bring these things from the store",
    "we met alice and bob at the station at seven",
    "open the window the room is getting warm",
    "my phone number is eight two four five five five one two",
    "the train to paris leaves from platform nine",
    "water boils at one hundred degrees",
    "can you help me find my keys before we leave",
    "the museum opens at ten and closes at five",
    "maria bought three apples and a loaf of bread",
    "it rained all day so we stayed inside and read",
    "the company hired forty new engineers this year",
    "turn left at the next corner and walk two blocks",
    "she plays the violin every sunday morning",
    "how many people live in this small village",
    "the cat sat quietly on the warm windowsill",
    "he painted the fence green and the door yellow",
    "send the report to the team before noon",
    "our flight was delayed by three hours",
    "they planted six trees along the river bank",
]


def embedded_codec(cache_root: str, config: MelRVQConfig | None = None, voices: Sequence[str] = ("en-us", "en-gb", "en-us+f3", "en-gb+m3"), seed: int = 0) -> MelRVQCodec:
    """The embedded mel-RVQ codec, fit on espeak-ng speech on first use and cached."""
    config = config or MelRVQConfig()
    key = hashlib.sha1(json.dumps({"v": 1, "cfg": asdict(config), "voices": list(voices), "seed": seed}, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_root, "codecs", f"mel-rvq-{key}")
    if os.path.exists(os.path.join(path, "codec.json")):
        return MelRVQCodec.load(path)
    from posttrain.audio.tts import synthesize

    wavs = []
    for i, text in enumerate(CODEC_SENTENCES):
        for j, voice in enumerate(voices):
            wav, _ = synthesize(text, voice=voice, rate=150 + 10 * ((i + j) % 4), sample_rate=config.sample_rate)
            wavs.append(wav)
    codec = MelRVQCodec(config).fit(wavs, seed=seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    codec.save(path)
    return codec
