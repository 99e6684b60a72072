import json
import os

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models.qwen_omni import (
    TinyTalkerSpec,
    TinyThinkerSpec,
    build_tiny_omni,
    build_tiny_thinker,
    code2wav_of,
    code_predictor_of,
    load_language_model,
    save_model,
    set_trainable,
    talker_of,
    thinker_of,
)
from posttrain.models.tokenizer import check_same_tokenizer


def test_embedded_tokenizer_round_trips_and_has_qwen_specials(tokenizer):
    text = "What is 12 + 7? héllo, 世界"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)
    rendered = tokenizer.decode(ids)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for special in ("<|audio_pad|>", "<|im_end|>", "<|tts_bos|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1


def test_tiny_thinker_save_load_round_trip(tokenizer, tmp_path):
    model = build_tiny_thinker(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), seed=1)
    ids = torch.tensor([tokenizer("What is 1 + 2?")["input_ids"]])
    expected = model(input_ids=ids).logits
    save_model(model, tokenizer, str(tmp_path / "thinker"))
    assert os.path.exists(tmp_path / "thinker" / "model.safetensors")
    loaded, loaded_tok = load_language_model(str(tmp_path / "thinker"))
    assert type(loaded).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()


def test_tiny_omni_has_every_part_and_round_trips(tokenizer, tmp_path):
    talker = TinyTalkerSpec(num_code_groups=4, codebook_size=64)
    model = build_tiny_omni(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), talker, seed=0)
    assert hasattr(thinker_of(model), "audio_tower")
    assert talker_of(model).config.num_code_groups == 4
    assert code_predictor_of(model).config.vocab_size == 64
    # Code2Wav turns [batch, groups, frames] codes into a waveform
    codes = torch.randint(0, 64, (1, 4, 6))
    with torch.no_grad():
        wav = code2wav_of(model)(codes)
    assert wav.shape[0] == 1 and wav.shape[-1] > 6 * 100
    save_model(model, tokenizer, str(tmp_path / "omni"))
    assert json.load(open(tmp_path / "omni" / "config.json"))["model_type"] == "qwen3_omni_moe"
    thinker, _ = load_language_model(str(tmp_path / "omni"))  # a full checkpoint gives its Thinker
    ids = torch.tensor([tokenizer("hello")["input_ids"]])
    assert torch.allclose(thinker(input_ids=ids).logits, thinker_of(model)(input_ids=ids).logits, atol=1e-6)


def test_set_trainable_selects_parts(tokenizer):
    model = build_tiny_omni(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), TinyTalkerSpec(codebook_size=64))
    n_text = set_trainable(model, "thinker_text")
    assert not any(p.requires_grad for p in thinker_of(model).audio_tower.parameters())
    assert all(p.requires_grad for p in thinker_of(model).model.parameters())
    n_audio = set_trainable(model, "audio_encoder")
    assert n_audio == sum(p.numel() for p in thinker_of(model).audio_tower.parameters())
    set_trainable(model, "code_predictor")
    assert all(p.requires_grad for p in code_predictor_of(model).parameters())
    assert not any(p.requires_grad for p in talker_of(model).model.parameters())
    assert n_text > 0
    with pytest.raises(ModelError, match="unknown trainable part"):
        set_trainable(model, "everything")


def test_missing_model_path_and_remote_code_are_refused(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_language_model(str(tmp_path / "nope"), "teacher")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        load_language_model("some-org/not-cached-model")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ModelError, match="remote code"):
        load_language_model(str(remote))


def test_tokenizer_mismatch_is_explained(tokenizer):
    from posttrain.models.tokenizer import build_embedded_tokenizer

    other = build_embedded_tokenizer(corpus=["hello world"] * 20, num_merges=5)
    with pytest.raises(ModelError, match="different tokenizer.*shared vocabulary"):
        check_same_tokenizer(tokenizer, other, "the student", "the math teacher")


@pytest.mark.slow
def test_smollm2_ships_in_a_package_and_answers(posttrain_cache):
    from posttrain.data.text import encode_prompt
    from posttrain.rollout import GenerationRequest, HFEngine, SamplingParams

    model, tok = load_language_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    engine = HFEngine(model, tok)
    [c] = engine.generate([GenerationRequest(encode_prompt(tok, "What is the capital of France?"), SamplingParams(12, 0.0))])
    assert "Paris" in c.text


def test_fresh_models_have_finite_initialised_weights(tokenizer):
    # garbage in freed memory must not leak into a new model's uninitialised parameters
    junk = torch.full((4_000_000,), float("nan"))
    del junk
    model = build_tiny_omni(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), TinyTalkerSpec(codebook_size=64))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith(("experts.down_proj", "experts.gate_up_proj")):
            assert p.abs().sum() > 0, name  # initialised, not left at zero
