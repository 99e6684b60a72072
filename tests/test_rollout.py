import pytest
import torch

from posttrain.models.qwen_omni import TinyThinkerSpec, build_tiny_thinker
from posttrain.rollout import GenerationRequest, HFEngine, SamplingParams


def _greedy_by_hand(model, ids, n, stop):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == stop:
                break
    return out


def test_hf_engine_greedy_matches_a_hand_written_loop_and_tags_versions(tokenizer):
    model = build_tiny_thinker(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), seed=3).eval()
    engine = HFEngine(model, tokenizer, batch_size=2)
    prompts = [tokenizer("What is 1 + 1?")["input_ids"], tokenizer("Reverse: abc")["input_ids"], tokenizer("x")["input_ids"]]
    reqs = [GenerationRequest(p, SamplingParams(6, temperature=0.0), request_id=f"r{i}") for i, p in enumerate(prompts)]
    out = engine.generate(reqs)
    assert [c.request_id for c in out] == ["r0", "r1", "r2"]  # order kept across batches
    for p, c in zip(prompts, out):
        assert c.token_ids == _greedy_by_hand(model, p, 6, tokenizer.eos_token_id)
        assert c.weight_version == 0
    engine.update_weights(None, 5)
    assert engine.generate(reqs[:1])[0].weight_version == 5


def test_update_weights_with_a_state_changes_outputs(tokenizer):
    a = build_tiny_thinker(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), seed=1)
    b = build_tiny_thinker(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), seed=2)
    engine = HFEngine(a, tokenizer)
    req = [GenerationRequest(tokenizer("hello")["input_ids"], SamplingParams(8, temperature=0.0))]
    before = engine.generate(req)[0].token_ids
    engine.update_weights(b.state_dict(), version=1)
    after = engine.generate(req)[0]
    assert after.token_ids == HFEngine(b, tokenizer).generate(req)[0].token_ids
    assert after.token_ids != before and after.weight_version == 1


def test_sampling_is_reproducible_with_a_seed(tokenizer):
    model = build_tiny_thinker(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), seed=1)
    engine = HFEngine(model, tokenizer)
    reqs = [GenerationRequest(tokenizer("hi")["input_ids"], SamplingParams(10, temperature=1.0)) for _ in range(4)]
    first = [c.token_ids for c in engine.generate(reqs, seed=7)]
    assert first == [c.token_ids for c in engine.generate(reqs, seed=7)]
    assert first != [c.token_ids for c in engine.generate(reqs, seed=8)]


def test_a_sampled_completion_does_not_depend_on_its_batch_and_reports_its_logprobs(tokenizer):
    model = build_tiny_thinker(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), seed=1).eval()
    texts = ["hi", "What is 1 + 1?", "Reverse: abcdef", "x", "hello there"]
    sampling = SamplingParams(10, temperature=1.0, top_p=0.9)
    reqs = [GenerationRequest(tokenizer(t)["input_ids"], sampling, request_id=i) for i, t in enumerate(texts)]
    together = HFEngine(model, tokenizer, batch_size=5).generate(reqs, seed=3)
    # One at a time, each request at its position: the same tokens.
    one_by_one = [HFEngine(model, tokenizer, batch_size=1).generate([r], seed=3, positions=[i])[0] for i, r in enumerate(reqs)]
    assert [c.token_ids for c in one_by_one] == [c.token_ids for c in together]
    # Split across two batches in another order: the same tokens again.
    split = HFEngine(model, tokenizer, batch_size=2).generate(reqs[::-1], seed=3, positions=[4, 3, 2, 1, 0])[::-1]
    assert [c.token_ids for c in split] == [c.token_ids for c in together]
    assert len({tuple(c.token_ids) for c in together}) > 1
    # The reported log-probs are the model's own (temperature 1) for the sampled tokens.
    for c in together:
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(c.prompt_ids) - 1:-1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(c.prompt_ids):, None]).squeeze(-1)
        assert c.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
