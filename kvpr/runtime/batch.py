"""Per-row bookkeeping of a batch: which cache slots hold real tokens, and their positions."""

from __future__ import annotations

import torch


class BatchState:
    """Validity and positions of every slot, on the compute device.

    Rows are left-padded: slot ``t`` of row ``i`` is a real token iff ``valid[i, t]``. A token's
    position counts the real tokens before it in its row, so padding never shifts positions.
    """

    def __init__(self, batch_size: int, max_len: int, device: torch.device) -> None:
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # [b, s_max]
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # [b, s_max]
        self.num_real = torch.zeros(batch_size, dtype=torch.long, device=device)  # [b]
        self.length = 0

    def append(self, valid_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``q`` slots; returns the new tokens' positions [b, q] and the attention mask.

        The mask [b, 1, q, length] lets query ``i`` see real keys up to its own slot. A padding
        query also sees itself, so its softmax stays finite (its output is never used).
        """
        start = self.length
        positions = self.advance(valid_new)
        end = self.length
        key_slots = torch.arange(end, device=valid_new.device)  # [S]
        query_slots = torch.arange(start, end, device=valid_new.device)  # [q]
        causal = key_slots.unsqueeze(0) <= query_slots.unsqueeze(1)  # [q, S]
        mask = causal.unsqueeze(0) & self.valid[:, :end].unsqueeze(1)  # [b, q, S]
        mask |= key_slots.unsqueeze(0) == query_slots.unsqueeze(1)
        return positions, mask.unsqueeze(1)

    def advance(self, valid_new: torch.Tensor) -> torch.Tensor:
        """``append`` without the mask (a decode step attends by slot validity): positions [b, q]."""
        q = valid_new.shape[1]
        start, end = self.length, self.length + q
        counts = self.num_real.unsqueeze(1) + valid_new.long().cumsum(dim=1)  # [b, q]
        positions = (counts - 1).clamp(min=0)
        self.valid[:, start:end] = valid_new
        self.positions[:, start:end] = positions
        self.num_real = counts[:, -1]
        self.length = end
        return positions

    # -- rows filled and freed between decode steps (continuous batching: row_batch.RowBatch) --------

    def place(self, rows: torch.Tensor, valid_rows: torch.Tensor) -> None:
        """Rows ``rows`` [k] now hold new prompts, left-padded in the last ``q`` slots: valid_rows [k, q].

        Everything the rows held before is dropped; their positions restart at 0.
        """
        k, q = valid_rows.shape
        start = self.length - q
        assert start >= 0 and rows.shape == (k,), (start, rows.shape, valid_rows.shape)
        counts = valid_rows.long().cumsum(dim=1)  # [k, q]
        self.valid[rows] = False
        self.positions[rows] = 0
        self.valid[rows, start : self.length] = valid_rows
        self.positions[rows, start : self.length] = (counts - 1).clamp(min=0)
        self.num_real[rows] = counts[:, -1]
