"""A seeded, learnable toy classification task for tests and smoke runs.

Each class ``c`` owns a few *signal* tokens. A sequence is random noise tokens with
``signals_per_seq`` signal tokens of its class planted at random positions; the label is ``c``.
Mean pooling over token embeddings can solve it, so the tiny transformer learns it in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset


class TensorDictDataset(Dataset):
    """Rows of equally long tensors as dicts (default collation stacks them into a batch)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        lengths = {t.shape[0] for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors have different lengths: {lengths}")
        self.tensors = tensors
        self.n = lengths.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def subset(self, idx: torch.Tensor | list[int]) -> TensorDictDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorDictDataset(**{k: v[idx] for k, v in self.tensors.items()})

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]


@dataclass
class SyntheticTask:
    num_classes: int = 2
    vocab_size: int = 64
    seq_len: int = 16
    signal_tokens: int = 3  # per class
    signals_per_seq: int = 3

    def generate(self, n: int, seed: int = 0,
                 label_probs: torch.Tensor | None = None) -> TensorDictDataset:
        """``n`` examples; ``label_probs`` skews the class mix (default uniform)."""
        first_noise = 1 + self.num_classes * self.signal_tokens
        if first_noise >= self.vocab_size:
            raise ValueError("vocab_size too small for the signal tokens")
        g = torch.Generator().manual_seed(seed)
        probs = (torch.full((self.num_classes,), 1.0 / self.num_classes) if label_probs is None
                 else label_probs)
        labels = torch.multinomial(probs, n, replacement=True, generator=g)
        ids = torch.randint(first_noise, self.vocab_size, (n, self.seq_len), generator=g)
        for s in range(self.signals_per_seq):
            pos = torch.randint(0, self.seq_len, (n,), generator=g)
            which = torch.randint(0, self.signal_tokens, (n,), generator=g)
            tok = 1 + labels * self.signal_tokens + which
            ids[torch.arange(n), pos] = tok
            del s
        mask = torch.ones_like(ids)
        return TensorDictDataset(input_ids=ids, attention_mask=mask, labels=labels)


def make_loader(ds: Dataset, batch_size: int = 32, shuffle: bool = True,
                seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)
