"""Small causal-LM training loops for the demo family: pretraining on text, and answer-only SFT.

Deterministic for a given seed on a given machine; AdamW with warm-up and cosine decay; a
progress bar per run. CPU-sized: the demo family trains in minutes on two cores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels: [B, L]
WARMUP_STEPS = 30


def text_batches(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], batch_size: int) -> Iterator[Batch]:
    """Each text a sequence ending in EOS; loss on every real token."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer([t + tokenizer.eos_token for t in texts[i : i + batch_size]], return_tensors="pt",
                        padding=True)
        yield enc.input_ids, enc.attention_mask, enc.input_ids.masked_fill(enc.attention_mask == 0, -100)


def answer_batches(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], batch_size: int
) -> Iterator[Batch]:
    """(prompt, answer) pairs as `prompt answer<eos>`; loss on the answer and EOS only."""
    for i in range(0, len(pairs), batch_size):
        seqs = [(tokenizer.encode(p), tokenizer.encode(" " + a) + [tokenizer.eos_token_id])
                for p, a in pairs[i : i + batch_size]]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for row, (prompt, answer) in enumerate(seqs):
            n = len(prompt) + len(answer)
            ids[row, :n] = torch.tensor(prompt + answer)
            mask[row, :n] = 1
            labels[row, len(prompt) : n] = torch.tensor(answer)
        yield ids, mask, labels


def train(
    model: torch.nn.Module,
    batches_for_epoch: Callable[[int], Iterator[Batch]],
    *,
    epochs: int,
    lr: float,
    description: str,
) -> torch.nn.Module:
    """Train in place; `batches_for_epoch(e)` may reshuffle or regenerate the data each epoch."""
    steps_per_epoch = sum(1 for _ in batches_for_epoch(0))
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    step = 0
    with tqdm(total=total, desc=description, unit="step") as bar:
        for epoch in range(epochs):
            for ids, mask, labels in batches_for_epoch(epoch):
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, step / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def shuffled(items: Sequence, epoch: int, seed: int) -> list:
    """A per-epoch permutation of `items`, the same on every run."""
    order = list(items)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
