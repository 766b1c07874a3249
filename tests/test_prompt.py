"""LLM input layout (chat template, audio splice, labels) and the decoding loop guard."""

import torch
from transformers import AutoTokenizer

from steermoe_core.model.decoding import trim_loops
from steermoe_core.model.prompt import PromptLayout, source_index


def layout(backbones, system=""):
    return PromptLayout(AutoTokenizer.from_pretrained(backbones["llm"]), system)


def test_training_layout_labels_only_target_and_end_of_turn(backbones):
    lay = layout(backbones)
    tok = lay.tok
    assert tok.convert_ids_to_tokens(lay.eot_id) == "<|im_end|>"
    b = lay.build([3, 5], ["Transcribe the audio.", "Transcribe the audio."], ["hello world", "one two three"])
    for i, target in enumerate(["hello world", "one two three"]):
        labelled = b.labels[i][b.labels[i] != -100].tolist()
        assert labelled == tok(target, add_special_tokens=False)["input_ids"] + [lay.eot_id]
        text = tok.decode(b.input_ids[i][b.attention_mask[i] == 1])
        assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text
    # right padding for training: the shorter row ends in masked padding
    assert b.attention_mask[0, -1] == 0 and b.attention_mask[1].all()
    # each target index points at the position just before its label
    flat_labels = b.labels.view(-1)
    torch.testing.assert_close(flat_labels[b.target_index + 1], b.target_labels)
    assert len(b.audio_index) == 8
    # padded to a multiple of 8 tokens (training's repeated shapes): the same rows, more masked padding
    p = lay.build([3, 5], ["Transcribe the audio."] * 2, ["hello world", "one two three"], pad_multiple=8)
    w = b.input_ids.shape[1]
    assert p.input_ids.shape[1] == -(-w // 8) * 8 > w and not p.attention_mask[:, w:].any()
    assert torch.equal(p.input_ids[:, :w], b.input_ids) and torch.equal(p.target_labels, b.target_labels)
    assert torch.equal(p.audio_index % p.input_ids.shape[1], b.audio_index % w)


def test_generation_layout_is_left_padded_and_audio_lands_in_place(backbones):
    lay = layout(backbones)
    b = lay.build([2, 6], ["Q?", "Transcribe the audio."])
    assert b.attention_mask[0, 0] == 0 and b.attention_mask[:, -1].all()
    assert (b.labels == -100).all() and len(b.target_index) == 0
    width = b.input_ids.shape[1]
    pre, _ = lay.around_audio("Q?")
    first = b.audio_index[0].item()
    off = width - int(b.attention_mask[0].sum())
    assert first == off + len(pre)
    assert source_index([[0, 1], [0, 1, 2, 3, 4, 5]], 7).tolist() == [0, 1, 7, 8, 9, 10, 11, 12]
    assert source_index([[1], [0, 4]], 7).tolist() == [1, 7, 11]


def test_system_prompt_replaces_the_templates_default(backbones):
    plain, custom = layout(backbones), layout(backbones, "You transcribe speech.")
    pre_plain, _ = plain.around_audio("x")
    pre_custom, _ = custom.around_audio("x")
    assert "You transcribe speech." in custom.tok.decode(pre_custom)
    assert "system" not in plain.tok.decode(pre_plain)


def test_loop_guard_cuts_runaway_repeats_only():
    assert trim_loops([5, 9, 9, 9, 9, 9, 9]) == [5, 9]
    assert trim_loops([1, 2, 3, 2, 3, 2, 3, 2, 3]) == [1, 2, 3]
    assert trim_loops([1, 2, 2, 2]) == [1, 2, 2, 2]  # three in a row can be speech ("no no no")
    assert trim_loops([4, 5, 6, 7]) == [4, 5, 6, 7]
