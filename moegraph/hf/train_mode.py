"""What a block does in training that its compiled layer does not: dropout, noise.

A compiled layer computes the block's eval-mode function in both modes: it has no dropout and adds no
noise. The reads' checks run in eval mode, where block and layer agree; in train() mode they do not (Switch
Transformers' experts drop 10% of their hidden units by default). Each difference found becomes a note of the
read, naming what differs, and a warning, so that a training run does not change silently: from ``from_hf`` and
``optimize`` at once where the block is in train() mode, otherwise (transformers loads models in eval() mode, and
most swaps serve inference) the first time one of the compiled layers is switched to train() mode
(``PendingTrainingWarning``). Inference is unaffected, and is not warned about.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["PendingTrainingWarning", "dropout_note", "expert_mode_note", "mode_note", "warn_training"]


def _dropouts(module: nn.Module) -> list[tuple[str, float]]:
    """(name, p) of the dropout modules with p > 0 in ``module``."""
    return [(n, float(m.p)) for n, m in module.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0]


def _listed(names: list[str]) -> str:
    """The first three names, and how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _same_in_train(run: Callable[[], Any], reference: torch.Tensor, seed: int) -> bool:
    """Whether ``run()`` (a call in train() mode, with the global generator seeded and restored afterwards) gives
    ``reference`` (the same call in eval() mode); a call that fails differs."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            out = run()
            out = out[0] if isinstance(out, tuple) else out
            return isinstance(out, torch.Tensor) and out.shape == reference.shape and torch.allclose(
                out.float(), reference.float(), rtol=1e-6, atol=1e-6)
        except Exception:  # noqa: BLE001 - a block that fails in train() mode differs there too
            return False


def dropout_note(block: nn.Module) -> str | None:
    """A note naming the block's dropout modules with p > 0 (None without any)."""
    found = _dropouts(block)
    if not found:
        return None
    ps = sorted({p for _, p in found})
    return (f"dropout (p={'/'.join(f'{p:g}' for p in ps)}) in {len(found)} module(s) of the block "
            f"({_listed([n for n, _ in found])}) is not reproduced: the compiled layer has no dropout, so in train() "
            "mode the swapped block differs from the original (eval outputs are equal)")


def mode_note(run: Callable[[], Any], reference: torch.Tensor, seed: int = 1) -> str | None:
    """A note when ``run()`` (the probe copy called once in train() mode, with the global generator seeded and
    restored afterwards) gives another output than ``reference`` (the same call in eval mode): training-time
    noise in the routing (``if self.training: logits += noise``), or dropout outside the experts."""
    if _same_in_train(run, reference, seed):
        return None
    return ("in train() mode the block routes or computes otherwise than in eval() mode on the same tokens (noise "
            "added to the router in training, or dropout outside the experts); the compiled layer computes the eval "
            "form in both modes, so training the swapped block differs from training the original")


def expert_mode_note(mlps: dict[str, nn.Module], x: torch.Tensor, seed: int = 1) -> str | None:
    """A note naming the expert / shared MLPs (name -> module) that compute otherwise in train() mode than in
    eval() mode on the tokens ``x`` [T, D]: dropout called as a function (``F.dropout(h, p, self.training)``),
    which ``dropout_note`` cannot see and the structural probe (stand-in experts) never runs. Each is run on a
    copy (its buffers, e.g. batch-norm statistics, are left as they are), with the global generator seeded and
    restored; MLPs whose dropout modules ``dropout_note`` names already are skipped."""
    import copy

    differ = []
    for name, mlp in mlps.items():
        if _dropouts(mlp):
            continue
        probe = copy.deepcopy(mlp)
        w = next(probe.parameters(), None)
        xs = x if w is None else x.to(w.device, w.dtype)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                want = probe.eval()(xs)
        except Exception:  # noqa: BLE001 - one that fails differs
            differ.append(name)
            continue
        if not _same_in_train(lambda: probe.train()(xs), want, seed):
            differ.append(name)
    if not differ:
        return None
    return (f"{_listed(differ)} compute(s) otherwise in train() mode than in eval() mode on the same tokens (dropout "
            "called as a function, or other training-only behaviour); the compiled layer computes the eval form in "
            "both modes, so training the swapped block differs from training the original")


def warn_training(notes_by_block: dict[str, tuple[str, list[str]]], where: str, stacklevel: int = 3) -> None:
    """One warning per distinct training note: the blocks (path -> (class, notes)) it concerns, and the note."""
    by_note: dict[str, list[str]] = {}
    for path, (cls, notes) in notes_by_block.items():
        for n in notes:
            by_note.setdefault(n, []).append(f"{path} ({cls})" if path else cls)
    for note, blocks in by_note.items():
        warnings.warn(f"{where}: {_listed(blocks)}: {note}", UserWarning, stacklevel=stacklevel)


def _caller_level() -> int:
    """``stacklevel`` for a warning from ``fire`` that points at the user's line: the first frame outside torch
    and moegraph (``Module.train`` recurses through every parent of the layer)."""
    import sys

    skip = tuple(os.path.dirname(m.__file__) for m in (torch, sys.modules["moegraph"]))
    frame, level = sys._getframe(1), 2  # fire's frame, level 2 of warn_training's warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


class PendingTrainingWarning:
    """``warn_training`` deferred until a compiled layer it is attached to (as ``_training_warning``; one object
    shared by every layer of one ``optimize``) is switched to train() mode (``runtime.MoELayer.train``): one
    warning for all the blocks, once."""

    def __init__(self, notes_by_block: dict[str, tuple[str, list[str]]], where: str) -> None:
        self.notes_by_block, self.where, self.fired = notes_by_block, where, False

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            warn_training(self.notes_by_block, self.where, stacklevel=_caller_level())

    @staticmethod
    def attach(layers: list[Any], notes_by_block: dict[str, tuple[str, list[str]]], where: str, now: bool) -> None:
        """Warn at once when ``now`` (the blocks were in train() mode), else attach one pending warning to
        ``layers`` (compiled layers)."""
        if not notes_by_block:
            return
        if now:
            warn_training(notes_by_block, where, stacklevel=4)
            return
        pending = PendingTrainingWarning(notes_by_block, f"train() on {where}")
        for layer in layers:
            layer.__dict__["_training_warning"] = pending
