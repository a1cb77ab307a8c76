"""MPCFormer-style two-stage distillation of an approximated model from its original.

The student starts from the teacher's weights with the approximations swapped in (that is how
:func:`~hf_secure.convert.approximate.convert_approximate` builds it).

* Stage 1 (``lr=5e-5``): mean squared error between teacher and student attention
  probabilities of every layer, plus hidden states of every layer, embeddings included.
* Stage 2 (``lr=1e-5``): the output: the mean squared error of the final hidden states (for a causal
  LM, the input of its head), MPCFormer's regression case; padding positions never count.
"""

from __future__ import annotations

import torch

from ..progress import progress


def _batches(tokenizer, texts: list[str], batch_size: int, max_length: int, gen: torch.Generator):
    order = torch.randperm(len(texts), generator=gen).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        yield tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over positions where ``mask`` (batch, seq) is 1; ``a``, ``b``: (batch, seq, ...)."""
    weight = mask.to(a.dtype).reshape(*mask.shape, *([1] * (a.dim() - 2)))
    return ((a - b) ** 2 * weight).sum() / (weight.sum() * a[0, 0].numel())


def distillation_loss(teacher, student, batch, stage: int) -> torch.Tensor:
    mask = batch["attention_mask"]
    with torch.no_grad():
        target = teacher(**batch, output_hidden_states=True, output_attentions=stage == 1)
    out = student(**batch, output_hidden_states=True, output_attentions=stage == 1)
    if stage == 2:
        return _masked_mse(out.hidden_states[-1], target.hidden_states[-1], mask)
    loss = sum(_masked_mse(s, t, mask) for s, t in zip(out.hidden_states, target.hidden_states))
    for s, t in zip(out.attentions, target.attentions):  # (batch, heads, query, key): query rows
        loss = loss + _masked_mse(s.transpose(1, 2), t.transpose(1, 2), mask)
    return loss


def distill(teacher, student, tokenizer, texts: list[str], epochs: tuple[int, int] = (2, 1),
            lrs: tuple[float, float] = (5e-5, 1e-5), batch_size: int = 8, max_length: int = 128,
            seed: int = 0) -> list[float]:
    """Train ``student`` in place; return the mean loss of every epoch (stage 1 epochs first)."""
    gen = torch.Generator().manual_seed(seed)
    teacher.eval()
    history = []
    per_epoch = -(-len(texts) // batch_size)
    with progress(sum(epochs) * per_epoch, "distillation", unit="batch") as bar:
        for stage, (n_epochs, lr) in enumerate(zip(epochs, lrs), start=1):
            optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
            for _ in range(n_epochs):
                student.train()
                losses = []
                for batch in _batches(tokenizer, texts, batch_size, max_length, gen):
                    loss = distillation_loss(teacher, student, batch, stage)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                    bar.set_postfix(stage=stage, loss=f"{losses[-1]:.4f}")
                    bar.update()
                history.append(sum(losses) / max(len(losses), 1))
    student.eval()
    return history
