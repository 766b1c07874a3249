"""How an example becomes one LLM sequence (docs/design.md#one-llm-sequence-per-example).

    [chat prefix ... user turn: ] [audio tokens] [\\n prompt, end of user turn, assistant header] [target <eot>]

The chat template is rendered as text around a placeholder, split there, and each side tokenised
once per distinct prompt. Audio embeddings are later written into the placeholder's positions.
Everything here is host-side bookkeeping: the indices it returns let the device splice embeddings
and pick target positions without a single data-dependent sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steermoe_core.encoders.base import padded_width

PLACEHOLDER = "<|steermoe_audio|>"
_MARK = "STEERMOEANSWERMARK"


@dataclass
class LLMBatch:
    input_ids: torch.Tensor  # (B, S); audio positions hold the pad id
    attention_mask: torch.Tensor  # (B, S) 1 = real token (audio included)
    audio_index: torch.Tensor  # flat positions in B*S that receive audio embeddings, example-major
    target_index: torch.Tensor  # flat positions whose hidden state predicts a target token
    target_labels: torch.Tensor  # the token each of those positions must predict
    labels: torch.Tensor  # (B, S) -100 except target and end-of-turn tokens (for HF-style losses)
    prefix_len: int = 0  # leading tokens identical in every row (the chat prefix before the audio); 0 = none shared


class PromptLayout:
    """Per-tokenizer state: the template pieces, cached per prompt, and the end-of-turn token."""

    def __init__(self, tokenizer, system_prompt: str = ""):
        self.tok = tokenizer
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eot_id = self._end_of_turn()
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _end_of_turn(self) -> int:
        if self.chat:
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
            text = self.tok.apply_chat_template(msgs, tokenize=False)
            rest = text.split(_MARK, 1)[1] if _MARK in text else ""
            ids = self._encode(rest)
            if ids and ids[0] in set(self.tok.all_special_ids):
                return ids[0]
        if self.tok.eos_token_id is None:
            raise ValueError("the LLM's tokenizer has neither a chat template end-of-turn nor an eos token")
        return self.tok.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        ids = [self.eot_id]
        if self.tok.eos_token_id is not None and self.tok.eos_token_id != self.eot_id:
            ids.append(self.tok.eos_token_id)
        return ids

    def pieces(self, prompt: str) -> tuple[list[int], str]:
        """Token ids before the audio, and the text after it, for a given prompt.

        The text is returned untokenised so an exporter can render the template once around a
        marker prompt and let a runtime without the chat template fill in any prompt later.
        """
        if self.chat:
            msgs = self.system + [{"role": "user", "content": f"{PLACEHOLDER}\n{prompt}"}]
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            pre, post = text.split(PLACEHOLDER, 1)
            return self._encode(pre), post
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + self._encode("Audio:"), f"\n{prompt}\nAnswer:"

    def around_audio(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the audio for a given prompt."""
        if prompt not in self._cache:
            pre, post = self.pieces(prompt)
            self._cache[prompt] = (pre, self._encode(post))
        return self._cache[prompt]

    def target_ids(self, text: str, max_tokens: int) -> list[int]:
        return self._encode(text)[:max_tokens] + [self.eot_id]

    def build(
        self,
        n_audio: list[int],
        prompts: list[str],
        targets: list[str] | None = None,
        max_target_tokens: int = 256,
        pad_multiple: int = 0,
    ) -> LLMBatch:
        """Training batches (targets given) are right-padded; generation batches are left-padded.

        ``pad_multiple`` > 0 pads the sequence to a multiple of that many tokens (masked), so batch
        shapes repeat (see ``encoders.base.padded_width`` for why that matters).

        ``audio_index`` pairs, token for token, with ``source_index`` over the pooled audio tensor.
        """
        rows, audio_spans, tgt_spans = [], [], []
        for i, (n, p) in enumerate(zip(n_audio, prompts)):
            pre, post = self.around_audio(p)
            tgt = self.target_ids(targets[i], max_target_tokens) if targets is not None else []
            rows.append(pre + [self.pad_id] * n + post + tgt)
            audio_spans.append((len(pre), n))
            tgt_spans.append((len(pre) + n + len(post), len(tgt)))
        width = padded_width(max(len(r) for r in rows), pad_multiple)
        b = len(rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        audio_index, target_index, target_labels = [], [], []
        for i, r in enumerate(rows):
            off = 0 if targets is not None else width - len(r)  # left padding for generation
            ids[i, off : off + len(r)] = torch.tensor(r)
            mask[i, off : off + len(r)] = 1
            a0, n = audio_spans[i]
            audio_index.extend(range(i * width + off + a0, i * width + off + a0 + n))
            t0, nt = tgt_spans[i]
            if nt:
                labels[i, off + t0 : off + t0 + nt] = torch.tensor(r[t0 : t0 + nt])
                target_index.extend(range(i * width + off + t0 - 1, i * width + off + t0 + nt - 1))
                target_labels.extend(r[t0 : t0 + nt])
        prefix = 0
        if targets is not None:  # right-padded: every row's prefix starts at position 0
            pres = [self.around_audio(p)[0] for p in prompts]
            prefix = len(pres[0]) if all(x == pres[0] for x in pres) else 0
        return LLMBatch(
            input_ids=ids, attention_mask=mask,
            audio_index=torch.tensor(audio_index, dtype=torch.long),
            target_index=torch.tensor(target_index, dtype=torch.long),
            target_labels=torch.tensor(target_labels, dtype=torch.long),
            labels=labels, prefix_len=prefix,
        )


def source_index(positions: list[list[int]], stride: int) -> torch.Tensor:
    """Flat indices of the audio tokens the LLM reads inside a (B, stride, H) pooled tensor, example-major:
    ``positions[i]`` are clip i's (all its real tokens, or those ``projector.drop_blank`` keeps)."""
    return torch.tensor([i * stride + j for i, pos in enumerate(positions) for j in pos], dtype=torch.long)
