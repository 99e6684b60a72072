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
