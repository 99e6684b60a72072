"""The one place that knows Qwen-Omni (transformers ``qwen3_omni_moe``).

Recipes never touch what lives here: config quirks of the tiny models, how the Thinker,
Talker, code predictor and Code2Wav sit inside the full model, how to load any of them by
hub name or path, and which parameters a stage trains.

Facts the code respects:
- The Thinker is an MoE text decoder with an audio encoder (and a vision encoder) in front;
  its rotary positions are 3-D (M-RoPE), so ``mrope_section`` must sum to head_dim / 2.
- The audio encoder's ``output_dim`` must equal the Thinker's hidden size.
- Codec tokens are ``[batch, groups, time]``: the Talker predicts group 0, the code
  predictor (MTP module) groups 1..G-1, Code2Wav turns all groups into a waveform.
- Some fields are read by the modeling code but not declared by the config classes
  (``thinker_config.vision_start_token_id``, ``talker_config.spatial_merge_size``,
  ``talker_config.text_config.shared_expert_intermediate_size``); the tiny builders set them.
- vLLM's CPU attention needs head_dim >= 32, so tiny models use 32.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass

import torch

from posttrain.config import option
from posttrain.errors import ModelError
from posttrain.models import hub
from posttrain.models.tokenizer import embedded_tokenizer, special_token_ids

OMNI = "qwen3_omni_moe"
THINKER = "qwen3_omni_moe_thinker"


@dataclass
class TinyThinkerSpec:
    """Size of a tiny random Thinker (text decoder + audio encoder + minimal vision encoder)."""

    hidden_size: int = option(128, "hidden size of the tiny Thinker's decoder", min=32)
    num_layers: int = option(2, "decoder layers", min=1)
    num_heads: int = option(4, "attention heads (head_dim is fixed at 32)", min=1)
    num_kv_heads: int = option(2, "key/value heads", min=1)
    num_experts: int = option(4, "MoE experts per layer", min=1)
    experts_per_token: int = option(2, "experts routed per token", min=1)
    audio_layers: int = option(2, "audio encoder layers", min=1)
    audio_hidden: int = option(64, "audio encoder width", min=32)
    num_mel_bins: int = option(128, "log-mel bins the audio encoder reads (128 as in Qwen3-Omni)", min=8)


@dataclass
class TinyTalkerSpec:
    """Size of a tiny random Talker + code predictor + Code2Wav."""

    hidden_size: int = option(128, "hidden size of the tiny Talker", min=32)
    num_layers: int = option(2, "Talker decoder layers", min=1)
    num_heads: int = option(4, "attention heads (head_dim is fixed at 32)", min=1)
    num_kv_heads: int = option(2, "key/value heads", min=1)
    num_experts: int = option(4, "MoE experts per layer", min=1)
    experts_per_token: int = option(2, "experts routed per token", min=1)
    num_code_groups: int = option(4, "codec codebooks (group 0 from the Talker, the rest from the code predictor)", min=2)
    codebook_size: int = option(256, "entries per codebook", min=2)
    predictor_layers: int = option(1, "code predictor layers", min=1)
    code2wav_hidden: int = option(64, "Code2Wav width", min=32)
    code2wav_layers: int = option(1, "Code2Wav transformer layers", min=1)


HEAD_DIM = 32
MROPE_SECTION = [4, 6, 6]  # sums to HEAD_DIM / 2


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _rope() -> dict:
    return {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": list(MROPE_SECTION),
        "interleaved": True,
        "mrope_interleaved": True,
    }


def thinker_config(tokenizer, spec: TinyThinkerSpec):
    """A Qwen3OmniMoeThinkerConfig of the given size whose token ids match ``tokenizer``."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

    ids = special_token_ids(tokenizer)
    vocab = _round_up(len(tokenizer))
    text = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=HEAD_DIM,
        moe_intermediate_size=spec.hidden_size,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.experts_per_token,
        max_position_embeddings=32768,
        rope_parameters=_rope(),
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    audio = dict(
        num_mel_bins=spec.num_mel_bins,
        encoder_layers=spec.audio_layers,
        encoder_attention_heads=max(1, spec.audio_hidden // HEAD_DIM),
        encoder_ffn_dim=2 * spec.audio_hidden,
        d_model=spec.audio_hidden,
        output_dim=spec.hidden_size,  # must equal the Thinker's hidden size
        downsample_hidden_size=32,
        n_window=50,
        n_window_infer=400,
        max_source_positions=1500,
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=1,
        out_hidden_size=spec.hidden_size,
        deepstack_visual_indexes=[0],  # must be below the vision depth
        patch_size=14,
    )
    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=text,
        audio_config=audio,
        vision_config=vision,
        audio_token_id=ids["<|audio_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        audio_start_token_id=ids["<|audio_start|>"],
        user_token_id=ids["user"],
    )
    cfg.vision_start_token_id = ids["<|vision_start|>"]  # read by get_rope_index, not declared
    return cfg


def omni_config(tokenizer, thinker: TinyThinkerSpec, talker: TinyTalkerSpec):
    """A full Qwen3OmniMoeConfig (Thinker + Talker + code predictor + Code2Wav), tiny."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    ids = special_token_ids(tokenizer)
    tcfg = thinker_config(tokenizer, thinker)
    k = talker.codebook_size
    codec_special = {  # codec control tokens sit just above the codebook
        "codec_pad_id": k,
        "codec_bos_id": k + 1,
        "codec_eos_token_id": k + 2,
        "codec_nothink_id": k + 3,
        "codec_think_bos_id": k + 4,
        "codec_think_eos_id": k + 5,
    }
    talker_text = dict(
        vocab_size=_round_up(k + 16, 16),
        hidden_size=talker.hidden_size,
        intermediate_size=2 * talker.hidden_size,
        num_hidden_layers=talker.num_layers,
        num_attention_heads=talker.num_heads,
        num_key_value_heads=talker.num_kv_heads,
        head_dim=HEAD_DIM,
        moe_intermediate_size=talker.hidden_size,
        num_experts=talker.num_experts,
        num_experts_per_tok=talker.experts_per_token,
        rope_parameters=_rope(),
    )
    predictor = dict(
        vocab_size=k,
        hidden_size=talker.hidden_size,
        intermediate_size=2 * talker.hidden_size,
        num_hidden_layers=talker.predictor_layers,
        num_attention_heads=talker.num_heads,
        num_key_value_heads=talker.num_kv_heads,
        head_dim=HEAD_DIM,
        num_code_groups=talker.num_code_groups,
        max_window_layers=talker.predictor_layers,
    )
    talker_cfg = dict(
        text_config=talker_text,
        code_predictor_config=predictor,
        num_code_groups=talker.num_code_groups,
        thinker_hidden_size=thinker.hidden_size,
        accept_hidden_layer=thinker.num_layers - 1,
        audio_token_id=ids["<|audio_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        audio_start_token_id=ids["<|audio_start|>"],
        speaker_id={"embedded": 0},
        **codec_special,
    )
    code2wav = dict(
        codebook_size=k,
        hidden_size=talker.code2wav_hidden,
        num_attention_heads=max(1, talker.code2wav_hidden // HEAD_DIM),
        num_key_value_heads=max(1, talker.code2wav_hidden // HEAD_DIM),
        intermediate_size=2 * talker.code2wav_hidden,
        num_hidden_layers=talker.code2wav_layers,
        num_quantizers=talker.num_code_groups,
        upsample_rates=[8, 5, 4, 2],
        upsampling_ratios=[2, 2],
        decoder_dim=64,
        sliding_window=16,
    )
    cfg = Qwen3OmniMoeConfig(
        thinker_config=tcfg.to_dict(),
        talker_config=talker_cfg,
        code2wav_config=code2wav,
        im_start_token_id=ids["<|im_start|>"],
        im_end_token_id=ids["<|im_end|>"],
        tts_pad_token_id=ids["<|tts_pad|>"],
        tts_bos_token_id=ids["<|tts_bos|>"],
        tts_eos_token_id=ids["<|tts_eos|>"],
        system_token_id=ids["system"],
        user_token_id=ids["user"],
        assistant_token_id=ids["assistant"],
    )
    # Read by the modeling code, not declared by the config classes.
    cfg.thinker_config.vision_start_token_id = ids["<|vision_start|>"]
    cfg.talker_config.spatial_merge_size = cfg.thinker_config.vision_config.spatial_merge_size
    cfg.talker_config.text_config.shared_expert_intermediate_size = talker.hidden_size
    return cfg


def _init_expert_weights(model, std: float = 0.02) -> None:
    """Initialise MoE expert weights explicitly: transformers 5.19 allocates some of them
    (e.g. the Talker's ``experts.down_proj``) with ``torch.empty`` and never initialises
    them, so a fresh model could hold whatever the memory held (NaN after a large load)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("experts"):
                for p in module.parameters(recurse=False):
                    p.normal_(0.0, std)


def build_tiny_thinker(tokenizer, spec: TinyThinkerSpec | None = None, seed: int = 0):
    """A random-initialised tiny Thinker of the real architecture (seconds to build)."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_config(tokenizer, spec or TinyThinkerSpec()))
    _init_expert_weights(model)
    return model.float()


def build_tiny_omni(tokenizer, thinker: TinyThinkerSpec | None = None, talker: TinyTalkerSpec | None = None, seed: int = 0):
    """A random-initialised tiny Thinker + Talker + code predictor + Code2Wav."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(seed)
    cfg = omni_config(tokenizer, thinker or TinyThinkerSpec(), talker or TinyTalkerSpec())
    model = Qwen3OmniMoeForConditionalGeneration(cfg)
    _init_expert_weights(model)
    return model.float()


# ---------------------------------------------------------------------------------------
# Parts of the full model


def thinker_of(model):
    """The Thinker inside a full Omni model (or the model itself if it is one)."""
    return getattr(model, "thinker", model)


def talker_of(model):
    """The Talker (codebook-0 decoder, with its code predictor) inside a full Omni model."""
    if not hasattr(model, "talker"):
        raise ModelError("this model has no Talker; load a full Qwen3-Omni model (thinker + talker)")
    return model.talker


def code_predictor_of(model):
    """The code predictor (multi-token prediction of residual codebooks 1..G-1)."""
    return talker_of(model).code_predictor


def code2wav_of(model):
    """Code2Wav, the codec decoder from all code groups to a waveform."""
    if not hasattr(model, "code2wav"):
        raise ModelError("this model has no Code2Wav; load a full Qwen3-Omni model")
    return model.code2wav


TRAINABLE_PARTS = ("thinker_text", "thinker", "audio_encoder", "talker", "code_predictor", "all")


def set_trainable(model, part: str) -> int:
    """Freeze everything except ``part``; returns the number of trainable parameters.

    thinker_text: the Thinker's decoder (not its audio/vision encoders); thinker: all of the
    Thinker; audio_encoder: the audio tower; talker / code_predictor: the Talker stages.
    A plain causal LM (a text teacher or student) trains whole for every Thinker part.
    """
    if part not in TRAINABLE_PARTS:
        raise ModelError(f"unknown trainable part {part!r}; choose one of {', '.join(TRAINABLE_PARTS)}")
    thinker = thinker_of(model)
    is_omni_thinker = hasattr(thinker, "audio_tower")
    for p in model.parameters():
        p.requires_grad_(part == "all")
    if part == "all":
        pass
    elif part in ("thinker_text", "thinker"):
        if not is_omni_thinker:
            for p in thinker.parameters():
                p.requires_grad_(True)
        else:
            modules = [thinker.model, thinker.lm_head]
            if part == "thinker":
                modules += [thinker.audio_tower, thinker.visual]
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(True)
    elif part == "audio_encoder":
        if not is_omni_thinker:
            raise ModelError("trainable part 'audio_encoder' needs a Qwen-Omni Thinker")
        for p in thinker.audio_tower.parameters():
            p.requires_grad_(True)
    elif part == "talker":
        for name, p in talker_of(model).named_parameters():
            p.requires_grad_(not name.startswith("code_predictor."))
    elif part == "code_predictor":
        for p in code_predictor_of(model).parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------
# Audio input: Whisper-style log-mel features and the audio placeholder tokens

AUDIO_SAMPLE_RATE = 16000


@functools.lru_cache(maxsize=4)
def audio_feature_extractor(num_mel_bins: int = 128):
    """The Thinker's feature extractor: Whisper log-mel, 16 kHz, 10 ms hop, built from its
    parameters (Qwen3-Omni ships the same settings in preprocessor_config.json)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(
        feature_size=num_mel_bins, sampling_rate=AUDIO_SAMPLE_RATE, hop_length=160, chunk_length=30, n_fft=400
    )


def audio_token_count(num_feature_frames):
    """Audio tokens the encoder emits for a clip of ``num_feature_frames`` mel frames
    (13 per 100 frames, i.e. ~12.5 per second)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(num_feature_frames)


def audio_inputs(wavs, num_mel_bins: int = 128) -> dict:
    """Model inputs for 16 kHz mono clips: ``input_features [n, mel, frames]``,
    ``feature_attention_mask [n, frames]`` and ``audio_tokens`` (placeholders per clip)."""
    fe = audio_feature_extractor(num_mel_bins)
    feats = fe(
        [w for w in wavs], sampling_rate=AUDIO_SAMPLE_RATE, padding="longest", truncation=False,
        return_attention_mask=True, return_tensors="pt",
    )
    frames = feats["attention_mask"].sum(-1)
    return {
        "input_features": feats["input_features"],
        "feature_attention_mask": feats["attention_mask"],
        "audio_tokens": audio_token_count(frames).tolist(),
    }


def audio_placeholder(num_tokens: int) -> str:
    """The text that stands for one clip in a prompt: its audio tokens between start/end marks."""
    return "<|audio_start|>" + "<|audio_pad|>" * int(num_tokens) + "<|audio_end|>"


def split_audio_inputs(inputs: dict) -> list[dict]:
    """Per-clip inputs (each clip's features trimmed to its own length) from `audio_inputs`."""
    out = []
    for i, n in enumerate(inputs["audio_tokens"]):
        frames = int(inputs["feature_attention_mask"][i].sum())
        out.append({"input_features": inputs["input_features"][i, :, :frames], "audio_tokens": n})
    return out


def batch_audio_inputs(clips: list[dict]) -> dict:
    """Stack per-clip features (``[mel, frames]`` each) into padded model inputs."""
    width = max(c["input_features"].shape[-1] for c in clips)
    mel = clips[0]["input_features"].shape[0]
    feats = torch.zeros((len(clips), mel, width))
    mask = torch.zeros((len(clips), width), dtype=torch.long)
    for i, c in enumerate(clips):
        n = c["input_features"].shape[-1]
        feats[i, :, :n] = c["input_features"]
        mask[i, :n] = 1
    return {"input_features": feats, "feature_attention_mask": mask}


# ---------------------------------------------------------------------------------------
# Loading and saving


def load_tokenizer(path: str):
    """A tokenizer by short name, folder or hub name (offline, no remote code)."""
    if path == "embedded":
        return embedded_tokenizer(hub.cache_root())
    from transformers import AutoTokenizer

    folder = hub.resolve(path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {type(e).__name__}: {e}") from None


def load_language_model(path: str, what: str = "model", trust_remote_code: bool = False):
    """(model, tokenizer) for a text-generating model by folder, hub name or short name.

    A full Qwen3-Omni checkpoint gives its Thinker (Talker dropped); a Thinker checkpoint
    loads as such; anything else loads with AutoModelForCausalLM. Weights load from
    safetensors; remote code runs only if the user asked for it.
    """
    trust_remote_code = trust_remote_code or hub.remote_code_allowed()  # the run's trust_remote_code key
    folder = hub.resolve(path, what)
    config = hub.read_config(folder)
    model_type = config.get("model_type", "")
    if config.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{what} {path!r} asks to run its own code (auto_map in config.json); posttrain never runs "
            "remote code unless you set trust_remote_code=true for it"
        )
    from transformers import (
        AutoModelForCausalLM,
        Qwen3OmniMoeForConditionalGeneration,
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch.float32)
    try:
        if model_type == OMNI:
            model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder, **kwargs)
            if hasattr(model, "disable_talker"):
                model.disable_talker()
            model = model.thinker
        elif model_type == THINKER:
            model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(folder, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot load {what} from {path!r} ({model_type or 'no model_type'}): {type(e).__name__}: {e}") from None
    tokenizer = load_tokenizer(folder)
    return model, tokenizer


def save_model(model, tokenizer, path: str) -> str:
    """Save in Hugging Face format (safetensors), atomically: a temp folder, then a rename."""
    tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = None
    if os.path.exists(path):
        old = f"{path.rstrip('/')}.old-{os.getpid()}"
        os.rename(path, old)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------
# The Talker on ARIA streams: training losses and generation
#
# One interleaved stream per utterance (posttrain.data.aria): a text item enters the Talker
# as the Thinker's token embedding through the Talker's text projection; a speech frame
# enters as the sum of its codebook embeddings (group 0 from the Talker's codec embedding,
# groups 1..G-1 from the code predictor's). The stream opens with the speaker's codec token
# and codec BOS. At every position the Talker predicts what comes next: codebook 0 of the
# next frame, READ (``codec_pad``: "give me the next text token") before a text item, or
# codec EOS after the last frame. Generation lets the model choose between speaking and
# reading, forces READ when one more frame would run ahead of the text (ARIA) and forbids it
# when the text is done. The code predictor then reads [Talker hidden, e0(c0), e1(c1), ...]
# and predicts c1..c_{G-1}, as in Qwen3-Omni.


def talker_special_ids(talker) -> dict[str, int]:
    """Codec control ids of a Talker, and where speaker tokens start."""
    cfg = talker.config
    return {
        "pad": cfg.codec_pad_id,
        "read": cfg.codec_pad_id,  # the Talker asks for the next text token
        "bos": cfg.codec_bos_id,
        "eos": cfg.codec_eos_token_id,
        "first_speaker": max(cfg.codec_pad_id, cfg.codec_bos_id, cfg.codec_eos_token_id, cfg.codec_nothink_id,
                             cfg.codec_think_bos_id, cfg.codec_think_eos_id) + 1,
    }


def speaker_slots(talker) -> int:
    """How many voices the Talker's codec vocabulary has room for."""
    return talker.config.text_config.vocab_size - talker_special_ids(talker)["first_speaker"]


def speaker_token(talker, speaker: int) -> int:
    """The codec token that selects voice number ``speaker``."""
    first = talker_special_ids(talker)["first_speaker"]
    vocab = talker.config.text_config.vocab_size
    if not 0 <= speaker < vocab - first:
        raise ModelError(f"speaker id {speaker} out of range: this Talker has {vocab - first} speaker slots")
    return first + speaker


def _frame_embeddings(talker, codes: torch.Tensor) -> torch.Tensor:
    """Sum of the codebook embeddings of frames ``[n, groups]`` -> ``[n, hidden]``."""
    emb = talker.model.codec_embedding(codes[:, 0])
    for g in range(1, codes.shape[1]):
        emb = emb + talker.code_predictor.model.codec_embedding[g - 1](codes[:, g])
    return emb


def talker_stream_batch(talker, text_embed, streams, codes, speakers, rates=None, ended=None, input_noise: float = 0.0,
                        generator: torch.Generator | None = None):
    """Model inputs and targets for a batch of ARIA streams.

    ``text_embed``: the Thinker's token embedding module; ``streams[b]``: items
    ``("text", token)`` / ``("speech", frame)``; ``codes[b]``: ``[groups, frames]``;
    ``speakers[b]``: voice number. Returns ``inputs_embeds``, ``attention_mask``,
    ``targets`` (what each position predicts: codebook 0, READ or EOS) and, per frame, the
    position whose hidden state predicts it (for the code predictor).

    With ``rates`` (one `AriaRate` per stream, as generation used), ``choice`` says what the
    generation policy could choose at each position: 0 nothing (or a READ the ARIA rule
    forced), 1 a codebook entry or READ, 2 a codebook entry or EOS (text done), so log-probs
    match the masked policy that sampled the stream (`talker_sequence_logps`). ``ended[b]``
    False: stream ``b`` stopped at the frame cap, not at EOS, so no EOS target.

    ``input_noise`` (training only): each frame fed back as input is, with this probability,
    replaced by another frame of the same utterance, while every target stays the true code.
    A Talker trained only on perfect histories has never continued after its own mistake
    and derails at the first one when it speaks (exposure bias); this teaches it to recover.
    """
    ids = talker_special_ids(talker)
    device = next(talker.parameters()).device
    rows, targets, choices, frame_pos, frame_codes = [], [], [], [], []
    for b, (stream, c, spk) in enumerate(zip(streams, codes, speakers)):
        rate = rates[b] if rates is not None else None
        total_text = sum(1 for k, _ in stream if k == "text")
        n_text = n_frames = 0
        choice = [0, 0]
        c = c.long().to(device)
        prefix = torch.tensor([speaker_token(talker, spk), ids["bos"]], device=device)
        parts = [talker.model.codec_embedding(prefix)]
        tgt = [-100, -100]
        text_ids = [v for k, v in stream if k == "text"]
        text_vecs = talker.text_projection(text_embed(torch.tensor(text_ids, device=device, dtype=torch.long))) if text_ids else None
        fed = c
        if input_noise > 0 and c.shape[1] > 1:
            n = c.shape[1]
            hit = torch.rand(n, generator=generator) < input_noise
            other = torch.randint(0, n, (n,), generator=generator)
            fed = torch.where(hit.to(device).unsqueeze(0), c[:, other.to(device)], c)
        frame_vecs = _frame_embeddings(talker, fed.T)
        t_i = 0
        for kind, value in stream:
            if rate is not None:  # what the masked policy could choose here
                text_done = n_text >= total_text
                forced = not text_done and n_frames + 1 > rate.allowed_frames(n_text)
                choice[-1] = 0 if forced else (2 if text_done else 1)
            if kind == "text":
                tgt[-1] = ids["read"]  # the position before a text item asks for it
                parts.append(text_vecs[t_i : t_i + 1])
                t_i += 1
                n_text += 1
            else:
                # the position before this frame predicts its codebook 0
                tgt[-1] = int(c[0, value])
                frame_pos.append((b, len(tgt) - 1))
                frame_codes.append(c[:, value])
                parts.append(frame_vecs[value : value + 1])
                n_frames += 1
            tgt.append(-100)
            choice.append(0)
        if ended is None or ended[b]:
            tgt[-1] = ids["eos"]
            choice[-1] = 2 if rate is not None else 0
        else:  # stopped at the frame cap: text after the last frame was never a decision
            last = max((j for j, (k, _) in enumerate(stream) if k == "speech"), default=-1)
            for j in range(last + 1, len(stream) + 1):
                tgt[j + 1] = -100
        rows.append(torch.cat(parts))
        targets.append(tgt)
        choices.append(choice)
    width = max(r.shape[0] for r in rows)
    hidden = rows[0].shape[1]
    embeds = torch.zeros((len(rows), width, hidden), device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    target = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
    choice = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for b, (r, t, ch) in enumerate(zip(rows, targets, choices)):
        embeds[b, : r.shape[0]] = r
        mask[b, : r.shape[0]] = 1
        target[b, : len(t)] = torch.tensor(t, device=device)
        choice[b, : len(ch)] = torch.tensor(ch, device=device)
    return {
        "choice": choice if rates is not None else None,
        "inputs_embeds": embeds,
        "attention_mask": mask,
        "targets": target,
        "frame_positions": torch.tensor(frame_pos, device=device, dtype=torch.long).view(-1, 2),
        "frame_codes": torch.stack(frame_codes) if frame_codes else torch.zeros((0, 1), dtype=torch.long),
    }


def _talker_forward(talker, batch):
    """(Talker hidden states [B, T, H], code-predictor logits [frames, G-1, K] or None)."""
    positions = torch.arange(batch["inputs_embeds"].shape[1], device=batch["inputs_embeds"].device)
    hidden = talker.model(
        inputs_embeds=batch["inputs_embeds"],
        attention_mask=batch["attention_mask"],
        position_ids=positions.unsqueeze(0).expand(batch["inputs_embeds"].shape[0], -1),
        use_cache=False,
    ).last_hidden_state
    fp, codes = batch["frame_positions"], batch["frame_codes"]
    groups = codes.shape[1]
    if fp.shape[0] == 0 or groups < 2:
        return hidden, None
    cp = talker.code_predictor
    seq = [hidden[fp[:, 0], fp[:, 1]], talker.model.codec_embedding(codes[:, 0])]
    for g in range(1, groups - 1):
        seq.append(cp.model.codec_embedding[g - 1](codes[:, g]))
    cp_out = cp.model(inputs_embeds=torch.stack(seq, dim=1), use_cache=False).last_hidden_state  # [frames, G, H]
    cp_logits = torch.stack([cp.lm_head[g - 1](cp_out[:, g]).float() for g in range(1, groups)], dim=1)
    return hidden, cp_logits


def talker_losses(talker, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook-0 + EOS cross-entropy of the Talker, cross-entropy of the code predictor
    on groups 1..G-1), each a mean over its tokens."""
    import torch.nn.functional as F

    hidden, cp_logits = _talker_forward(talker, batch)
    logits = talker.codec_head(hidden).float()
    talker_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), ignore_index=-100)
    if cp_logits is None:
        return talker_loss, torch.zeros((), device=hidden.device)
    codes = batch["frame_codes"]
    cp_loss = F.cross_entropy(cp_logits.reshape(-1, cp_logits.shape[-1]), codes[:, 1:].reshape(-1))
    return talker_loss, cp_loss


def talker_sequence_logps(talker, batch, temperature: float = 1.0, code_predictor_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-sequence log-probabilities of streams under the policy that generates them.

    With ``batch["choice"]`` (a batch built with rates) the Talker's logits are masked as in
    `talker_generate` (codebook + READ while text remains, codebook + EOS after it; READs the
    ARIA rule forced count as certain), at ``temperature``. Returns ``talker`` [B] (codebook 0,
    READ, EOS), ``code_predictor`` [B] (groups 1..G-1), ``total`` = talker +
    ``code_predictor_weight`` x code_predictor, and ``tokens`` [B] (scored decisions)."""
    hidden, cp_logits = _talker_forward(talker, batch)
    logits = talker.codec_head(hidden).float() / temperature
    targets = batch["targets"]
    ids = talker_special_ids(talker)
    codebook = talker.code_predictor.config.vocab_size
    choice = batch.get("choice")
    if choice is not None:
        vocab = logits.shape[-1]
        allowed = torch.zeros((3, vocab), dtype=torch.bool, device=logits.device)
        allowed[1, :codebook] = True
        allowed[1, ids["read"]] = True
        allowed[2, :codebook] = True
        allowed[2, ids["eos"]] = True
        logits = logits.masked_fill(~allowed[choice], -1e9)
        scored = (targets != -100) & (choice > 0)
    else:
        scored = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    talker_lp = (logp * scored).sum(-1)
    cp_lp = torch.zeros_like(talker_lp)
    if cp_logits is not None:
        codes = batch["frame_codes"]
        frame_lp = torch.log_softmax(cp_logits / temperature, -1).gather(-1, codes[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)
        cp_lp = cp_lp.index_add(0, batch["frame_positions"][:, 0], frame_lp)
    return {"talker": talker_lp, "code_predictor": cp_lp, "total": talker_lp + code_predictor_weight * cp_lp, "tokens": scored.sum(-1)}


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """One sample per row of ``logits`` [B, V] (greedy at temperature 0)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = torch.where(logits < kth, torch.full_like(logits, -float("inf")), logits)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def talker_generate_batch(talker, text_embed, text_tokens, speakers, rates, temperature: float = 0.0, top_k: int = 0,
                          seed: int | None = None, max_frames: int | None = None, on_frame=None,
                          code_temperature: float | None = None):
    """Speak several texts at once: a list of ``(codes [groups, frames], stream, ended, logp)``.

    Every row advances by one item per step (a text token it READs or a frame it speaks), so
    rows stay aligned in position and share one KV cache. The model chooses to speak a frame
    or READ the next text token; READ is forced whenever one more frame would run ahead of the
    text (ARIA) and forbidden once the text is done; a row ends at codec EOS (allowed once its
    text is done; ``ended`` True) or at its scheduler's frame cap (``ended`` False).
    ``logp`` is the log-probability of the row's choices under the masked policy at
    ``temperature`` (at 1 when greedy; ``top_k`` truncation ignored): the behaviour policy's
    log-prob for RL, which `talker_sequence_logps` recomputes from the stream.
    ``code_temperature``: the code predictor's own temperature for groups 1..G-1 (Qwen3-TTS's
    ``subtalker_temperature``; ``None`` = ``temperature``). At 0 it picks the most likely
    residual codes, which are then certain (they add 0 to ``logp``): sampling only the Talker's
    own decisions makes the rollouts differ where an RL ratio over those decisions looks.
    ``on_frame(row, n, frames)`` is called after every frame (streaming decoders hook in here).
    """
    from transformers import DynamicCache

    from posttrain.data.aria import AriaScheduler

    ids = talker_special_ids(talker)
    device = next(talker.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    n = len(text_tokens)
    scheds = [AriaScheduler(t, r, max_frames) for t, r in zip(text_tokens, rates)]
    cache = DynamicCache(config=talker.config.text_config)
    cp = talker.code_predictor
    groups = talker.config.num_code_groups
    codebook = cp.config.vocab_size
    position = 0

    def step(embeds):  # [n, k, hidden] -> last hidden state of each row
        nonlocal position
        k = embeds.shape[1]
        pos = torch.arange(position, position + k, device=device).unsqueeze(0).expand(n, -1)
        position += k
        out = talker.model(inputs_embeds=embeds, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    prefix = torch.tensor([[speaker_token(talker, s), ids["bos"]] for s in speakers], device=device)
    hidden = step(talker.model.codec_embedding(prefix))
    streams = [[] for _ in range(n)]
    frames = [[] for _ in range(n)]
    ended = [False] * n
    logps = [0.0] * n
    scale = temperature if temperature > 0 else 1.0
    code_t = temperature if code_temperature is None else code_temperature
    code_scale = code_t if code_t > 0 else 1.0
    active = [not sc.finished for sc in scheds]
    while any(active):
        logits = talker.codec_head(hidden).float()
        allowed = torch.full_like(logits, -float("inf"))
        for b, sc in enumerate(scheds):
            if not active[b]:
                allowed[b, ids["pad"]] = 0.0  # a finished row idles on a token nobody reads
            elif sc.must_feed_text():
                allowed[b, ids["read"]] = 0.0
            else:
                allowed[b, :codebook] = 0.0
                allowed[b, ids["eos"] if sc.text_done else ids["read"]] = 0.0
        choice_t = _sample(logits + allowed, temperature, top_k, generator)
        free = torch.log_softmax((logits + allowed) / scale, -1).gather(-1, choice_t.unsqueeze(-1)).squeeze(-1).tolist()
        choice = choice_t.tolist()
        next_embeds = torch.zeros_like(hidden)
        reads, speaks = [], []
        for b in range(n):
            if not active[b]:
                continue
            if not scheds[b].must_feed_text():  # a forced READ is certain
                logps[b] += free[b]
            if choice[b] == ids["read"]:
                reads.append((b, scheds[b].feed_text()))
            elif choice[b] == ids["eos"]:
                active[b], ended[b] = False, True
            else:
                speaks.append(b)
        if reads:
            tokens = torch.tensor([t for _, t in reads], device=device)
            next_embeds[[b for b, _ in reads]] = talker.text_projection(text_embed(tokens))
            for b, t in reads:
                streams[b].append(("text", t))
        if speaks:  # the code predictor fills groups 1..G-1 of these rows' frames
            code0 = torch.tensor([choice[b] for b in speaks], device=device)
            frame = [code0]
            seq = [hidden[speaks], talker.model.codec_embedding(code0)]
            for g in range(1, groups):
                h = cp.model(inputs_embeds=torch.stack(seq, dim=1), use_cache=False).last_hidden_state[:, -1]
                g_logits = cp.lm_head[g - 1](h).float()
                code = _sample(g_logits, code_t, top_k, generator)
                if code_t > 0 or temperature <= 0:  # a greedy code predictor under sampling is certain
                    g_lp = torch.log_softmax(g_logits / code_scale, -1).gather(-1, code.unsqueeze(-1)).squeeze(-1).tolist()
                    for i, b in enumerate(speaks):
                        logps[b] += g_lp[i]
                frame.append(code)
                if g < groups - 1:
                    seq.append(cp.model.codec_embedding[g - 1](code))
            frame = torch.stack(frame, dim=1)  # [rows, groups]
            next_embeds[speaks] = _frame_embeddings(talker, frame)
            for i, b in enumerate(speaks):
                scheds[b].add_frame()
                streams[b].append(("speech", len(frames[b])))
                frames[b].append(frame[i].tolist())
                if on_frame is not None:
                    on_frame(b, len(frames[b]), frames[b])
                if scheds[b].finished:
                    active[b] = False
        if not any(active):
            break
        hidden = step(next_embeds.unsqueeze(1))
    out = []
    for b, sc in enumerate(scheds):
        while not sc.text_done:  # text the speech never reached still belongs to the stream
            streams[b].append(("text", sc.feed_text()))
        codes = torch.tensor(frames[b], dtype=torch.long).T if frames[b] else torch.zeros((groups, 0), dtype=torch.long)
        out.append((codes, streams[b], ended[b], logps[b]))
    return out


def talker_generate(talker, text_embed, text_tokens, speaker: int, rate, temperature: float = 0.0, top_k: int = 0,
                    seed: int | None = None, max_frames: int | None = None, on_frame=None):
    """Speak ``text_tokens``: codes ``[groups, frames]`` and the ARIA stream that produced
    them (one row of `talker_generate_batch`). ``on_frame(n, frames)`` after every frame."""
    hook = (lambda b, k, frames: on_frame(k, frames)) if on_frame is not None else None
    codes, stream, _, _ = talker_generate_batch(talker, text_embed, [text_tokens], [speaker], [rate], temperature, top_k, seed, max_frames, hook)[0]
    return codes, stream
