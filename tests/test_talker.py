"""The tiny Talker on ARIA streams: training and free-running generation agree (a Talker
that memorised one utterance speaks it back, code for code, within the rate constraint)."""

import torch

from posttrain.data.aria import AriaRate, build_stream, check_stream
from posttrain.models.qwen_omni import (
    TinyTalkerSpec,
    TinyThinkerSpec,
    build_tiny_omni,
    set_trainable,
    speaker_token,
    talker_generate,
    talker_losses,
    talker_of,
    talker_stream_batch,
    thinker_of,
)


def test_talker_memorises_an_utterance_and_generation_reproduces_it(tokenizer):
    torch.manual_seed(0)
    model = build_tiny_omni(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), TinyTalkerSpec(num_code_groups=3, codebook_size=32, num_layers=1))
    talker, embed = talker_of(model), thinker_of(model).model.embed_tokens
    set_trainable(model, "talker")
    for p in talker.code_predictor.parameters():
        p.requires_grad_(True)
    words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ["hi", "there", "friend"]]
    spans = [(0, 6), (6, 14), (14, 20)]
    codes = torch.randint(0, 32, (3, 20), generator=torch.Generator().manual_seed(1))
    rate = AriaRate(frames_per_token=20 / sum(map(len, words)) * 1.2, lead=2)
    stream = build_stream(words, spans, 20, rate)
    batch = talker_stream_batch(talker, embed, [stream], [codes], [1])
    n_text = sum(map(len, words))
    assert int((batch["targets"] != -100).sum()) == 20 + n_text + 1  # frames, READs before text, EOS
    params = [p for p in talker.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(150):
        l0, l1 = talker_losses(talker, talker_stream_batch(talker, embed, [stream], [codes], [1]))
        loss = l0 + 0.3 * l1
        first = first if first is not None else (l0.item(), l1.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert l0.item() < 0.1 * first[0] and l1.item() < 0.1 * first[1]
    talker.eval()
    generated, gen_stream = talker_generate(talker, embed, [t for w in words for t in w], 1, rate, temperature=0.0)
    assert torch.equal(generated, codes)
    assert check_stream(gen_stream, sum(map(len, words)), rate) is None
    # another voice is another conditioning: the memorised codes do not come back unchanged
    other, _ = talker_generate(talker, embed, [t for w in words for t in w], 2, rate, temperature=0.0)
    assert speaker_token(talker, 2) != speaker_token(talker, 1)
    assert other.shape != codes.shape or not torch.equal(other, codes)


def test_input_noise_swaps_fed_frames_but_keeps_every_target(tokenizer):
    talker, embed = _random_talker(tokenizer)
    words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ["hi", "there", "friend"]]
    codes = torch.randint(0, 32, (3, 40), generator=torch.Generator().manual_seed(1))
    rate = AriaRate(frames_per_token=40 / sum(map(len, words)) * 1.2, lead=2)
    stream = build_stream(words, [(0, 12), (12, 28), (28, 40)], 40, rate)
    clean = talker_stream_batch(talker, embed, [stream], [codes], [1])
    assert torch.equal(talker_stream_batch(talker, embed, [stream], [codes], [1], input_noise=0.0)["inputs_embeds"], clean["inputs_embeds"])
    noisy = talker_stream_batch(talker, embed, [stream], [codes], [1], input_noise=0.3, generator=torch.Generator().manual_seed(0))
    for key in ("targets", "frame_positions", "frame_codes"):  # what is learned stays the truth
        assert torch.equal(noisy[key], clean[key])
    changed = (noisy["inputs_embeds"] - clean["inputs_embeds"]).abs().sum(-1)[0] > 0
    frame_inputs = clean["frame_positions"][:, 1] + 1  # where each frame is fed back
    assert not changed[: 2].any()  # speaker and BOS
    n_changed = int(changed[frame_inputs].sum())
    assert 4 <= n_changed <= 20 and int(changed.sum()) == n_changed  # ~30% of 40 frames, text untouched


def _random_talker(tokenizer, seed=0):
    torch.manual_seed(seed)
    model = build_tiny_omni(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), TinyTalkerSpec(num_code_groups=3, codebook_size=32, num_layers=1), seed=seed)
    return talker_of(model).eval(), thinker_of(model).model.embed_tokens


def test_batched_generation_equals_one_at_a_time_and_keeps_the_rate(tokenizer):
    from posttrain.models.qwen_omni import talker_generate_batch

    talker, embed = _random_talker(tokenizer)
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["hello there", "a much longer sentence to speak", "yes"]]
    rates = [AriaRate(3.0, 2), AriaRate(2.0, 1), AriaRate(4.0, 3)]
    batch = talker_generate_batch(talker, embed, texts, [0, 1, 2], rates, temperature=0.0)
    for (codes, stream, ended, logp), text, rate, spk in zip(batch, texts, rates, [0, 1, 2]):
        single, single_stream = talker_generate(talker, embed, text, spk, rate, temperature=0.0)
        assert torch.equal(codes, single) and stream == single_stream
        assert check_stream(stream, len(text), rate) is None
        assert [v for k, v in stream if k == "text"] == text
        assert logp < 0


def test_sequence_logps_recompute_the_sampling_policy(tokenizer):
    """What generation says it sampled with equals what the trainer computes from the
    stream: masks, forced READs, EOS or cap, and the code predictor, at the temperature."""
    from posttrain.models.qwen_omni import talker_generate_batch, talker_sequence_logps

    talker, embed = _random_talker(tokenizer, seed=3)
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["one two three", "four", "five six seven eight"]] * 2
    rates = [AriaRate(2.5, 2)] * len(texts)
    for temperature in (1.0, 0.7):
        out = talker_generate_batch(talker, embed, texts, [0, 1, 2, 0, 1, 2], rates, temperature=temperature, seed=5, max_frames=40)
        assert {o[2] for o in out} == {True, False} or temperature != 1.0  # both endings are covered
        batch = talker_stream_batch(talker, embed, [o[1] for o in out], [o[0] for o in out], [0, 1, 2, 0, 1, 2], rates=rates, ended=[o[2] for o in out])
        with torch.no_grad():
            lp = talker_sequence_logps(talker, batch, temperature=temperature)
        expected = torch.tensor([o[3] for o in out])
        assert torch.allclose(lp["total"], expected, atol=1e-3), (lp["total"], expected)
        frames = torch.tensor([o[0].shape[1] for o in out])
        assert torch.all(lp["tokens"] >= frames)


def test_greedy_code_predictor_samples_only_the_talkers_decisions(tokenizer):
    """``code_temperature=0``: the Talker samples codebook 0, READ and EOS, the code predictor
    takes its most likely residual codes, and the behaviour log-prob is the Talker's part alone
    (what an RL ratio over the Talker's decisions needs)."""
    from posttrain.models.qwen_omni import talker_generate_batch, talker_sequence_logps

    talker, embed = _random_talker(tokenizer, seed=4)
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["one two three", "four five"]] * 2
    rates = [AriaRate(2.5, 2)] * len(texts)
    out = talker_generate_batch(talker, embed, texts, [0, 1, 0, 1], rates, temperature=1.0, seed=7, max_frames=30, code_temperature=0.0)
    batch = talker_stream_batch(talker, embed, [o[1] for o in out], [o[0] for o in out], [0, 1, 0, 1], rates=rates, ended=[o[2] for o in out])
    with torch.no_grad():
        lp = talker_sequence_logps(talker, batch, temperature=1.0, code_predictor_weight=0.0)
        sharp = talker_sequence_logps(talker, batch, temperature=1e-4)
    assert torch.allclose(lp["total"], torch.tensor([o[3] for o in out]), atol=1e-3)
    # every residual code is the code predictor's argmax: its log-prob at a vanishing temperature
    # is ~0 (up to near-ties that batched and teacher-forced float sums order differently)
    assert torch.all(sharp["code_predictor"] > -0.5), sharp["code_predictor"]
    # and sampling the residual codes too would have chosen other ones
    sampled = talker_generate_batch(talker, embed, texts, [0, 1, 0, 1], rates, temperature=1.0, seed=7, max_frames=30)
    batch = talker_stream_batch(talker, embed, [o[1] for o in sampled], [o[0] for o in sampled], [0, 1, 0, 1], rates=rates, ended=[o[2] for o in sampled])
    with torch.no_grad():
        assert torch.all(talker_sequence_logps(talker, batch, temperature=1e-4)["code_predictor"] < -100.0)


def test_gspo_on_talker_rollouts_learns_a_reward_it_can_see(tokenizer):
    """The whole RL path on speech rollouts (batched sampling with a greedy code predictor, the
    recomputed sequence log-probs, group advantages, GSPO's clipped sequence ratio): with a reward
    for shorter speech, the Talker learns to end sooner within a few steps."""
    from posttrain.losses import gspo_loss_from_log_ratio
    from posttrain.models.qwen_omni import talker_generate_batch, talker_sequence_logps

    talker, embed = _random_talker(tokenizer, seed=5)
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["one two three", "four five six seven"]]
    rates, group = [AriaRate(2.5, 2)] * 2, 8
    params = [p for p in talker.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)

    def rollouts(seed):
        out = talker_generate_batch(talker, embed, [t for t in texts for _ in range(group)], [0, 1] * group, rates * group,
                                    temperature=1.0, seed=seed, max_frames=40, code_temperature=0.0)
        return out, torch.tensor([float(o[0].shape[1]) for o in out])

    def mean_frames(seeds):
        with torch.no_grad():
            return float(torch.cat([rollouts(s)[1] for s in seeds]).mean())

    before = mean_frames(range(100, 104))
    for step in range(8):
        out, frames = rollouts(step)
        speakers = [0, 1] * group
        batch = talker_stream_batch(talker, embed, [o[1] for o in out], [o[0] for o in out], speakers, rates=rates * group, ended=[o[2] for o in out])
        old = torch.tensor([o[3] for o in out])
        talker.train()
        lp = talker_sequence_logps(talker, batch, temperature=1.0, code_predictor_weight=0.0)
        tokens = lp["tokens"].float().clamp_min(1.0)
        # rows are laid out text by text inside each group of the loss
        order = [i for t in range(2) for i in range(t, 2 * group, 2)]
        log_ratio = ((lp["total"] - old) / tokens)[order]
        loss = gspo_loss_from_log_ratio(log_ratio, -frames[order], group, tokens[order] > 0, 0.2, 0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        talker.eval()
    after = mean_frames(range(100, 104))
    assert after < 0.8 * before, (before, after)
