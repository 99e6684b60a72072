"""On-policy audio -> text distillation on tiny settings: the loss against a hand computation
with teacher and student prompts of different lengths, a run whose parameters move and whose
audio-text divergence falls, bad audio skipped (named, counted) or failing, and a teacher with
another tokenizer refused with an explanation."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import DataError, ModelError
from posttrain.losses import masked_mean, response_logits, reverse_kl_per_token
from posttrain.training import response_view
from recipes import defaults_path, load_recipe

RECIPE = "thinker_audio_distill"
TINY = [
    "student.size.hidden_size=64",
    "student.size.num_layers=1",
    "student.size.audio_hidden=64",
    "student.size.audio_layers=1",
    "student.size.num_mel_bins=32",
    "ears.text_steps=60",
    "ears.ear_steps=20",
    "ears.batch_size=16",
    "data.repeats=1",
    "data.eval_size=8",
    "data.voices=[en-us]",
    "data.rates=[260]",
    "data.pitches=[50]",
    "batch_size=8",
    "eval_every=0",
    "log_every=5",
    "generation.max_new_tokens=4",
]


def _tiny_spec():
    from posttrain.models.qwen_omni import TinyThinkerSpec

    return TinyThinkerSpec(hidden_size=64, num_layers=1, audio_hidden=32, audio_layers=1, num_mel_bins=32)


TINY_SPEC = _tiny_spec()


def _config(tmp_path, *extra):
    module = load_recipe(RECIPE)
    return module, load_config(module.Config, defaults_path(RECIPE), TINY + [f"output_dir={tmp_path}", *extra])


# --------------------------------------------------------------------------- the loss by hand


class TableModel(torch.nn.Module):
    """A 'language model' whose logits at a position are a fixed row per input token, so the
    logits that predict each response token are known by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, use_cache=False, **extra):
        return type("Out", (), {"logits": self.table[input_ids]})()


def _hand_reverse_kl(p_logits, q_logits):
    p = [math.exp(x) for x in p_logits]
    q = [math.exp(x) for x in q_logits]
    zp, zq = sum(p), sum(q)
    return sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q))


def test_reverse_kl_aligns_views_with_different_prompt_lengths():
    vocab = 5
    g = torch.Generator().manual_seed(0)
    student_table = torch.randn(16, vocab, generator=g)
    teacher_table = torch.randn(16, vocab, generator=g)
    # The student hears (long prompts: audio placeholders), the teacher reads (short prompts).
    student_prompts = [[11, 12, 13, 14, 15, 6], [11, 12, 13, 7]]
    teacher_prompts = [[8, 9], [10, 9, 8, 3, 2]]
    responses = [[1, 2, 0], [4, 0]]  # one sampled answer each, scored by both views
    pad = 0
    s_logits, mask, targets = response_view(TableModel(student_table), student_prompts, responses, pad)
    t_logits, t_mask, _ = response_view(TableModel(teacher_table), teacher_prompts, responses, pad)
    assert torch.equal(mask, t_mask) and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    loss = masked_mean(reverse_kl_per_token(s_logits, t_logits), mask)

    # By hand: response token k is predicted at the position of the token before it, which is
    # the prompt's last token for k = 0 and response[k-1] after that, in each view separately.
    total, count = 0.0, 0
    for sp, tp, resp in zip(student_prompts, teacher_prompts, responses):
        for k in range(len(resp)):
            s_prev = sp[-1] if k == 0 else resp[k - 1]
            t_prev = tp[-1] if k == 0 else resp[k - 1]
            total += _hand_reverse_kl(student_table[s_prev].tolist(), teacher_table[t_prev].tolist())
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)

    # response_logits directly: row b's logits that predict its response start at start[b] - 1.
    full = student_table[torch.tensor([[11, 12, 13, 14, 15, 6, 1, 2]])]
    got = response_logits(full, torch.tensor([6]), 2)
    assert torch.equal(got[0, 0], student_table[6]) and torch.equal(got[0, 1], student_table[1])


# --------------------------------------------------------------------------- a tiny run


def test_distillation_moves_parameters_and_lowers_audio_text_divergence(tmp_path):
    module, cfg = _config(tmp_path, "max_steps=24", "save_every=0")
    original = {}
    real_set_trainable = module.set_trainable

    def spy(student, part):  # keep a copy of the student's starting weights
        original.update({k: v.detach().clone() for k, v in student.state_dict().items()})
        return real_set_trainable(student, part)

    module.set_trainable = spy
    try:
        result = module.run(cfg)
    finally:
        module.set_trainable = real_set_trainable
    summary = json.load(open(os.path.join(result.run_dir, "summary.json")))
    metrics = summary["metrics"]
    div = metrics["audio_text_divergence"]
    assert div["better"] == "lower" and div["after"] < 0.8 * div["before"], div
    assert metrics["accuracy_gap"]["better"] == "lower"
    for name in ("accuracy/audio", "accuracy/text"):
        assert 0.0 <= metrics[name]["after"] <= 1.0
    gap = metrics["accuracy_gap"]
    assert gap["after"] == pytest.approx(metrics["accuracy/text"]["after"] - metrics["accuracy/audio"]["after"])
    from safetensors.torch import load_file

    trained = load_file(os.path.join(result.run_dir, "model", "model.safetensors"))
    moved = [k for k in trained if k in original and not torch.equal(trained[k], original[k])]
    assert any(k.startswith("audio_tower.") for k in moved)  # the ears change ...
    assert any("layers.0.self_attn" in k for k in moved)  # ... and so does the decoder
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots", "model", "checkpoints"):
        assert name in os.listdir(result.run_dir)
    logged = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    assert any("divergence/audio" in m and "divergence/text_anchor" in m for m in logged)


# --------------------------------------------------------------------------- bad input


def _spoken_file(tmp_path):
    """A jsonl of three spoken queries: one good clip, one missing file, one unreadable file."""
    from posttrain.audio.io import save_wav

    t = np.arange(16000) / 16000.0
    save_wav(str(tmp_path / "good.wav"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    (tmp_path / "broken.wav").write_bytes(b"this is not audio")
    rows = [
        {"prompt": "What is 1 + 2?", "audio": "good.wav", "answer": "3"},
        {"prompt": "What is 2 + 2?", "audio": "missing.wav", "answer": "4"},
        {"prompt": "What is 3 + 2?", "audio": "broken.wav", "answer": "5"},
    ]
    path = tmp_path / "spoken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_audio_is_skipped_with_each_sample_named(tmp_path, capsys):
    path = _spoken_file(tmp_path)
    module, cfg = _config(tmp_path, f"data.path={path}", "data.on_bad_audio=skip", "student.path=unused")
    rows = module.read_spoken_rows(path)
    kept = module.attach_audio(rows, cfg, "training")
    out = capsys.readouterr().out
    assert [r["prompt"] for r in kept] == ["What is 1 + 2?"] and "clip" in kept[0]
    assert "skipped 2 of 3 training samples" in out
    assert "spoken.jsonl, line 2" in out and "missing.wav" in out
    assert "spoken.jsonl, line 3" in out and "broken.wav" in out


def test_bad_audio_fails_naming_the_sample_before_a_run_directory_exists(tmp_path, tokenizer):
    from posttrain.models.qwen_omni import build_tiny_thinker, save_model

    path = _spoken_file(tmp_path)
    student = str(tmp_path / "student")
    save_model(build_tiny_thinker(tokenizer, TINY_SPEC), tokenizer, student)
    module, cfg = _config(tmp_path, f"data.path={path}", "data.on_bad_audio=fail", "data.eval_size=1",
                          f"student.path={student}")
    with pytest.raises(DataError, match=r"spoken\.jsonl, line [23]: .*(missing|broken)\.wav.*on_bad_audio=skip"):
        module.run(cfg)
    assert not os.path.exists(os.path.join(str(tmp_path), RECIPE))


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tokenizer):
    from posttrain.models.qwen_omni import build_tiny_thinker, save_model
    from posttrain.models.tokenizer import build_embedded_tokenizer

    spec = TINY_SPEC
    other = build_embedded_tokenizer(corpus=["what is one plus two"] * 20, num_merges=8)
    save_model(build_tiny_thinker(other, spec), other, str(tmp_path / "other-teacher"))
    module, cfg = _config(tmp_path, f"teacher={tmp_path / 'other-teacher'}", "student.size.audio_hidden=32")
    student = build_tiny_thinker(tokenizer, spec)
    with pytest.raises(ModelError, match="different tokenizer.*shared vocabulary"):
        module.load_teacher(cfg, student, tokenizer)


def test_user_data_run_skips_bad_audio_and_reads_the_students_mel_bins(tmp_path, tokenizer, capsys):
    from posttrain.audio.io import save_wav
    from posttrain.models.qwen_omni import build_tiny_thinker, save_model

    t = np.arange(12000) / 16000.0
    rows = []
    for i in range(6):
        save_wav(str(tmp_path / f"q{i}.wav"), (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32), 16000)
        rows.append({"prompt": f"{i} + 1", "audio": f"q{i}.wav", "answer": str(i + 1)})
    rows.append({"prompt": "9 + 1", "audio": "gone.wav", "answer": "10"})
    path = tmp_path / "user.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = str(tmp_path / "student")
    save_model(build_tiny_thinker(tokenizer, TINY_SPEC), tokenizer, student)  # reads 32 mel bins
    module, cfg = _config(tmp_path, f"data.path={path}", "data.eval_size=2", f"student.path={student}",
                          "student.size.num_mel_bins=64", "max_steps=2", "save_every=0", "batch_size=4")
    result = module.run(cfg)
    out = capsys.readouterr().out
    assert re.search(r"skipped 1 of \d+ (training|held-out) samples", out), out
    assert "user.jsonl, line 7" in out and "gone.wav" in out
    assert out.count("skipped") == 1  # counted once, not again when features are redone for 32 mel bins
    metrics = result.summary["metrics"]
    assert set(metrics) >= {"audio_text_divergence", "accuracy/audio", "accuracy/text", "accuracy_gap"}
    assert all(m["after"] is not None for m in metrics.values())
