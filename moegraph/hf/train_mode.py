"""What a block does in training that its compiled layer does not: dropout, noise.

A compiled layer computes the block's eval-mode function in both modes: it has no dropout and adds no
noise. The reads' checks run in eval mode, where block and layer agree; in train() mode they do not (Switch
Transformers' experts drop 10% of their hidden units by default). Each difference found becomes a note of the
read, naming what differs, and a warning from ``from_hf`` and ``optimize``, so that a training run does not
change silently; inference is unaffected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["dropout_note", "mode_note", "warn_training"]


def dropout_note(block: nn.Module) -> str | None:
    """A note naming the block's dropout modules with p > 0 (None without any)."""
    found = [(n, float(m.p)) for n, m in block.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0]
    if not found:
        return None
    ps = sorted({p for _, p in found})
    names = ", ".join(n for n, _ in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"dropout (p={'/'.join(f'{p:g}' for p in ps)}) in {len(found)} module(s) of the block ({names}) is not "
            "reproduced: the compiled layer has no dropout, so in train() mode the swapped block differs from the "
            "original (eval outputs are equal)")


def mode_note(run: Callable[[], Any], reference: torch.Tensor, seed: int = 1) -> str | None:
    """A note when ``run()`` (the probe copy called once in train() mode, with the global generator seeded and
    restored afterwards) gives another output than ``reference`` (the same call in eval mode): training-time
    noise in the routing (``if self.training: logits += noise``), or dropout outside the experts."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            out = run()
            out = out[0] if isinstance(out, tuple) else out
            same = isinstance(out, torch.Tensor) and out.shape == reference.shape and torch.allclose(
                out.float(), reference.float(), rtol=1e-6, atol=1e-6)
        except Exception:  # noqa: BLE001 - a block that fails in train() mode differs there too
            same = False
    if same:
        return None
    return ("in train() mode the block routes or computes otherwise than in eval() mode on the same tokens (noise "
            "added to the router in training, or dropout outside the experts); the compiled layer computes the eval "
            "form in both modes, so training the swapped block differs from training the original")


def warn_training(notes_by_block: dict[str, tuple[str, list[str]]], where: str) -> None:
    """One warning per distinct training note: the blocks (path -> (class, notes)) it concerns, and the note."""
    by_note: dict[str, list[str]] = {}
    for path, (cls, notes) in notes_by_block.items():
        for n in notes:
            by_note.setdefault(n, []).append(f"{path} ({cls})" if path else cls)
    for note, blocks in by_note.items():
        shown = ", ".join(blocks[:3]) + (f" and {len(blocks) - 3} more" if len(blocks) > 3 else "")
        warnings.warn(f"{where}: {shown}: {note}", UserWarning, stacklevel=3)
