"""Packed (padding-free) batches: rows of [B, S] tokens holding several documents, as transformers'
`DataCollatorWithFlattening` makes them (position_ids restarting at 0, or cu_seq_lens_q). A recurrent model must start
every document from an empty state: the sequence ops (conv, mLSTM, sLSTM) run in `DocumentLayout`'s right-padded
[n_docs, longest] layout, everything else on the packed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DocumentLayout:
    """Packed rows [B, S] holding several documents, and the right-padded layout [n_docs, longest] in which the
    sequence ops (conv, mLSTM, sLSTM) run, every document from an empty state; the projections, norms and
    feed-forwards stay on the packed tokens. Padding sits after each document's last token, so causal ops never carry
    it into a real position."""

    index: torch.Tensor  # [n_docs, longest] flat position in the B * S tokens (clamped in the padding)
    mask: torch.Tensor | None  # [n_docs, longest] bool, True for real tokens; None when no document is padded
    doc: torch.Tensor  # [B * S] document of each packed token
    pos: torch.Tensor  # [B * S] its position inside the document
    rows: tuple[int, int]  # (B, S)

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> DocumentLayout:
        """starts [B, S] bool marking each document's first token (every row starts one)."""
        B, S = starts.shape
        flat = starts.reshape(-1).clone()
        flat[::S] = True
        doc = flat.long().cumsum(0) - 1
        first = flat.nonzero().squeeze(-1)  # [n_docs] flat index of each document's first token
        pos = torch.arange(B * S, device=starts.device) - first[doc]
        lengths = torch.bincount(doc, minlength=first.shape[0])
        steps = torch.arange(int(lengths.max()), device=starts.device)
        index = (first[:, None] + steps).clamp(max=B * S - 1)
        mask = steps[None, :] < lengths[:, None]
        return cls(index, None if bool(mask.all()) else mask, doc, pos, (B, S))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, S, *F] -> [n_docs, longest, *F]"""
        return t.reshape(-1, *t.shape[2:])[self.index]

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        """[n_docs, longest, *F] -> [B, S, *F]"""
        return t[self.doc, self.pos].view(*self.rows, *t.shape[2:])

    def heads(self, t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """[B, NH, S, ...] -> [n_docs, NH, longest, ...], or back with `inverse`."""
        return (self.scatter if inverse else self.gather)(t.transpose(1, 2)).transpose(1, 2)


def document_starts(
    kwargs: dict[str, Any], attention_mask: torch.Tensor | None, B: int, S: int, device: torch.device
) -> torch.Tensor | None:
    """[B, S] bool marking the first token of each packed document, or None for one document per row.

    Boundaries come from `cu_seq_lens_q` / `cu_seq_lens_k` (cumulative lengths over the flattened batch) or, without
    an attention_mask, from `position_ids` restarting at 0 (what DataCollatorWithFlattening produces)."""
    cu = kwargs.get("cu_seq_lens_q")
    cu = kwargs.get("cu_seq_lens_k") if cu is None else cu
    if cu is not None:
        cu = cu.to(device).long()
        if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != B * S or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"cu_seq_lens_q must rise from 0 to B * S = {B * S} (the flattened batch), got {cu.tolist()}"
            )
        starts = torch.zeros(B * S, dtype=torch.bool, device=device)
        starts[cu[:-1][cu[:-1] < B * S]] = True
        return starts.view(B, S) if bool(starts.view(B, S)[:, 1:].any()) else None
    position_ids = kwargs.get("position_ids")
    if position_ids is None or attention_mask is not None:
        return None
    if tuple(position_ids.shape) != (B, S):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(B, S)}")
    starts = position_ids.to(device) == 0
    return starts if bool(starts[:, 1:].any()) else None
