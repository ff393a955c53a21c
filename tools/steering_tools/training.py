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

# input_ids, attention_mask, labels: [B, L]; and optionally each example's loss weight: [B]
Batch = tuple[torch.Tensor, ...]
WARMUP_STEPS = 30


def text_batches(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], batch_size: int) -> Iterator[Batch]:
    """Each text a sequence ending in EOS; loss on every real token."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer([t + tokenizer.eos_token for t in texts[i : i + batch_size]], return_tensors="pt",
                        padding=True)
        yield enc.input_ids, enc.attention_mask, enc.input_ids.masked_fill(enc.attention_mask == 0, -100)


def answer_batches(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], batch_size: int,
    weight: Callable[[str], float] | None = None,
) -> Iterator[Batch]:
    """(prompt, answer) pairs as `prompt answer<eos>`; loss on the answer and EOS only, each
    example's weighted by `weight(answer)` if given."""
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        seqs = [(tokenizer.encode(p), tokenizer.encode(" " + a) + [tokenizer.eos_token_id]) for p, a in chunk]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for row, (prompt, answer) in enumerate(seqs):
            n = len(prompt) + len(answer)
            ids[row, :n] = torch.tensor(prompt + answer)
            mask[row, :n] = 1
            labels[row, len(prompt) : n] = torch.tensor(answer)
        if weight is None:
            yield ids, mask, labels
        else:
            yield ids, mask, labels, torch.tensor([weight(a) for _, a in chunk], dtype=torch.float32)


def weighted_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the labelled tokens, each weighted by its example's weight and
    normalised by the total weight: with every weight 1, the model's own mean loss."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                  reduction="none")  # [B, L-1]
    token_weights = weights[:, None] * (targets != -100)
    return (per_token * token_weights).sum() / token_weights.sum()


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
            for batch in batches_for_epoch(epoch):
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, step / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * step / total))
                if len(batch) == 4:
                    loss = weighted_loss(model, *batch)
                else:
                    ids, mask, labels = batch
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
