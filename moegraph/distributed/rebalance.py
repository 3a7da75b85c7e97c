"""Closing the loop while running: a windowed routing recorder and a ``Rebalancer``.

    rb = Rebalancer(layers, every=200)                 # or threshold=1.15 (measured max/mean load)
    for batch in stream:                               # an inference loop ...
        model(batch); rb.step()
    opt.step(); opt.zero_grad(); rb.step()             # ... or after every optimizer step (rb() == rb.step())
    trainer.add_callback(rb.as_trainer_callback())     # ... or in a Hugging Face Trainer (on_step_end)

``WindowRecorder`` keeps the top-k ids of the last ``max_tokens`` tokens each layer routed in a ring
buffer on the layer's device (memory bounded: ``max_tokens`` x (K int32 + one int64) per layer, no
host transfer per forward) and is a ``RoutingRecorder``, so ``gather_trace`` reads it. The
``Rebalancer`` installs one on every layer; when a re-plan is due (``every`` steps after the last
one, or when the measured imbalance exceeds ``threshold``) it gathers the window from every rank
into one trace (the same on every rank), re-plans on rank 0
from the running plan (``moegraph.planner.replan.replan``: moves priced over the tokens the new plan
is expected to serve until the next re-plan, optional budget; deterministic, but rank 0's plan is
broadcast, so that ranks agree whatever floating point does on each host), and applies the
new plan to every layer at once (``migrate.apply_plan``: every rank agrees on it, only the changed slots
move, optimizer state included, and the model moves whole or not at all). A window the
re-plan refuses (no tokens; a budget that allows no move) keeps the current plan and is recorded as
skipped; either way the windows start again empty. A migration that fails (a ``DistributedError``)
leaves every layer on the current plan and the window as it was, is recorded as ``failed`` and
raised.

Measured imbalance: each rank counts the (token, expert) assignments its experts computed
(``Traffic.computed_total``, which ``reset_traffic`` leaves alone; forwards while paused, which the
windows do not record, left out too); per check the counts since the last check (or re-plan) are
all-gathered and the max/mean over ranks is averaged over the layers: the runtime's own figure, not
the planner's prediction. A check re-plans when that figure exceeds ``threshold`` by more than its sampling noise (the re-plan's ``noise_floor`` of the assignments
counted: a few steps of small batches put even a balanced plan well above 1); a figure above the
threshold but within its noise keeps the baseline, so the counts accumulate until the next check
can tell. The counts of the last window's tokens (``window_tokens`` per rank: the traffic the re-plan would
read) are judged beside them, so that a stretch spent just above the threshold does not slow the response to
a later drift (``_LoadCheck``). (``benchmarks/rebalance_threshold.py``: 4 gloo ranks, deepseek-v3-tiny, 60 steps of a topic
switch, threshold 1.08: with 8 tokens per rank and step the re-plans fell from 59 to 7 and the slots
moved from 90 to 73, max/mean over the first and last thirds 1.102 / 1.048 -> 1.062 / 1.057; with 64
tokens 16 -> 9 re-plans, 126 -> 97 slots, 1.035 / 1.048 -> 1.035 / 1.044. Keeping the windows of
re-plans that moved nothing was tried too and not kept: older traffic in the window slowed the
re-plans after the switch; ``benchmarks/results/planner_design.md``.)
``measured_imbalance()`` reads the same figure without moving the check's baseline, so that a
loop may log it.

Every method that communicates is a collective: every rank calls ``step`` at the same points.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DistributedError, PlanInfeasible, TraceError, is_integer, is_number, short_repr
from ..fileio import check_input, write_atomically
from ..planner.replan import DEFAULT_MOVE_TARGET
from ..runtime import RoutingRecorder
from ..semantics.routing import modulo_hash_experts

__all__ = ["WindowRecorder", "Rebalancer", "drift_demo", "drift_stream", "STATE_PLAN", "STATE_FILE",
           "STATE_WINDOWS"]

#: files ``Rebalancer.save_state`` writes beside a checkpoint: the running plan, and the Rebalancer's counters
STATE_PLAN = "moegraph_plan.json"
STATE_FILE = "moegraph_rebalancer.json"
#: each rank's windows, beside them (``{rank}``: the rank, ``{world}``: the world size)
STATE_WINDOWS = "moegraph_windows.rank{rank}-of-{world}.npz"


class WindowRecorder(RoutingRecorder):
    """A ``RoutingRecorder`` bounded to the most recent ``max_tokens`` tokens.

    A ring buffer per layer: top-k ids as int32 [max_tokens, K] and sample ids as int64 [max_tokens],
    allocated at the first forward on the device its ids are on (a forward costs a copy on the device,
    no transfer to the host: the window crosses to the host only when it is read). New tokens overwrite
    the oldest; a forward larger than the window keeps ``max_tokens`` of its tokens spread evenly over
    it, so that every sequence of the batch is in the window, not only the last ones. A forward without
    tokens (an idle rank's), or one while ``paused``, adds nothing. ``seen`` counts the tokens added since
    the last ``clear``, those overwritten included.
    """

    def __init__(self, max_tokens: int = 8192) -> None:
        if not _is_count(max_tokens):
            raise DistributedError(f"WindowRecorder max_tokens (tokens each layer's window keeps) must be an integer "
                                   f">= 1, got {short_repr(max_tokens)}")
        self.max_tokens = int(max_tokens)
        self.paused = False  # forwards while paused are not recorded (``Rebalancer.pause``)
        self._ids: torch.Tensor | None = None  # [max_tokens, K] ring
        self._samples: torch.Tensor | None = None  # [max_tokens] ring
        self.clear()

    def clear(self) -> None:
        super().__init__()  # the base's lists stay empty: the ring holds the window
        self._held = 0  # tokens in the ring
        self._next_row = 0  # where the next token goes
        self.seen = 0

    def add(self, ids_BSK) -> None:
        b, s, k = ids_BSK.shape
        n = b * s
        if n == 0 or self.paused:
            return
        ids = ids_BSK.detach().reshape(n, k)
        samples = torch.arange(self._next_sample, self._next_sample + b, dtype=torch.int64,
                               device=ids.device).repeat_interleave(s)
        self._next_sample += b
        self.seen += n
        cap = self.max_tokens
        if n > cap:
            keep = torch.arange(cap, device=ids.device) * n // cap  # evenly spread over the forward
            ids, samples, n = ids[keep], samples[keep], cap
        if self._ids is None or self._ids.shape[1] != k or self._ids.device != ids.device:
            with torch.inference_mode(False):  # a buffer that later forwards, in any mode, may write
                self._ids = torch.empty(cap, k, dtype=torch.int32, device=ids.device)
                self._samples = torch.empty(cap, dtype=torch.int64, device=ids.device)
            self._held = self._next_row = 0
        first = min(n, cap - self._next_row)
        self._ids[self._next_row:self._next_row + first] = ids[:first]
        self._samples[self._next_row:self._next_row + first] = samples[:first]
        if n > first:  # wrap around
            self._ids[:n - first] = ids[first:]
            self._samples[:n - first] = samples[first:]
        self._next_row = (self._next_row + n) % cap
        self._held = min(self._held + n, cap)

    def _in_order(self, ring: torch.Tensor | None, empty: torch.Tensor) -> torch.Tensor:
        """The ring's tokens oldest first, on the host: a copy, which later forwards do not overwrite."""
        if ring is None or self._held == 0:
            return empty
        if self._held < self.max_tokens:
            return ring[:self._held].to("cpu", copy=True)
        return torch.cat([ring[self._next_row:], ring[:self._next_row]]).cpu()

    def ids(self) -> torch.Tensor:
        return self._in_order(self._ids, torch.empty(0, 0, dtype=torch.int32))

    def samples(self) -> torch.Tensor:
        return self._in_order(self._samples, torch.empty(0, dtype=torch.int64))

    def snapshot(self) -> dict[str, np.ndarray]:
        """The window as arrays (oldest token first) and its counters: what ``restore`` takes back."""
        return {"ids": self.ids().numpy(), "samples": self.samples().numpy(),
                "counters": np.array([self.seen, self._next_sample], np.int64)}

    def restore(self, ids: np.ndarray, samples: np.ndarray, counters: np.ndarray, device: torch.device) -> None:
        """Put a ``snapshot`` back (its most recent ``max_tokens`` tokens where it holds more) on ``device``."""
        self.clear()
        self.seen, self._next_sample = int(counters[0]), int(counters[1])
        ids, samples = ids[-self.max_tokens:], samples[-self.max_tokens:]
        n = len(ids)
        if n == 0:
            return
        with torch.inference_mode(False):
            self._ids = torch.zeros(self.max_tokens, ids.shape[1], dtype=torch.int32, device=device)
            self._samples = torch.zeros(self.max_tokens, dtype=torch.int64, device=device)
        self._ids[:n] = torch.as_tensor(ids, dtype=torch.int32, device=device)
        self._samples[:n] = torch.as_tensor(samples, dtype=torch.int64, device=device)
        self._held, self._next_row = n, n % self.max_tokens


def _max_mean(span: np.ndarray) -> float:
    """Mean over layers of max/mean over ranks of ``span`` [W, L] (assignments computed); 1 for a layer without any."""
    span = np.asarray(span, np.float64)
    mean = span.mean(axis=0)
    return float(np.where(mean > 0, span.max(axis=0) / np.maximum(mean, 1e-12), 1.0).mean())


class _LoadCheck:
    """The threshold trigger's decision, on counts every rank gathered (so the same decision on every rank).

    Fed per check the (token, expert) assignments each rank's experts computed since the baseline ([W, L]) and
    the tokens each rank's window recorded since it was emptied ([W]); the figure is ``_max_mean`` of them. A
    figure at most ``threshold`` moves the baseline here. Above it, the check is due when the figure exceeds
    ``threshold`` by more than its sampling floor (``floor``), judged twice: over every count since the baseline
    (a small excess that persists shows as the counts accumulate), and over those of the last window's tokens
    (from the oldest check since which no rank's window recorded more than ``window_tokens``; one check's counts
    at least), so that a drift after a long stretch just above the threshold shows within about a window,
    not after as many steps again. Two tests instead of one: a balanced layer fires on noise at most about
    twice as often. Remembers the baseline and the checks within the last window, at most ``_KEEP`` of them
    (beyond that every other one is dropped: a coarser start, still within the window).
    """

    _KEEP = 64

    def __init__(self, threshold: float, window_tokens: int, world: int, layers: int) -> None:
        self.threshold, self.window_tokens, self.shape = float(threshold), int(window_tokens), (world, layers)
        self.reset()

    def reset(self, seen: np.ndarray | None = None) -> None:
        """A new baseline; ``seen``: the tokens the windows had recorded at it (None: none, they were emptied)."""
        start = np.zeros(self.shape[0], np.int64) if seen is None else np.array(seen, np.int64)
        self._checks: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(self.shape, np.int64), start)]

    @staticmethod
    def floor(span: np.ndarray) -> float:
        """The sampling noise of ``_max_mean(span)``: each layer's ``noise_floor`` of its assignments, averaged."""
        from ..planner.replan import noise_floor

        return float(np.mean([noise_floor(span.shape[0], int(n), 1) for n in span.sum(axis=0)]))

    def _recent(self, seen: np.ndarray) -> int:
        """Index of the oldest remembered check (0: the baseline) since which no rank's window recorded more than
        ``window_tokens`` tokens (the newest if none)."""
        return next((i for i, (_, s0) in enumerate(self._checks) if (seen >= s0).all()
                     and int((seen - s0).max()) <= self.window_tokens), len(self._checks) - 1)

    def decide(self, counts: np.ndarray, seen: np.ndarray) -> tuple[float, bool, bool]:
        """(figure, due, baseline moved) for this check, which is remembered (the caller moves its own baseline
        when told; a due check is followed by a re-plan, which resets). The figure is that of every count since
        the baseline, or the last window's where that one alone is due."""
        counts, seen = np.array(counts, np.int64), np.array(seen, np.int64)  # copies: remembered
        measured = _max_mean(counts)
        if measured <= self.threshold:
            self.reset(seen)
            return measured, False, True
        due = measured > self.threshold + self.floor(counts)
        start = self._recent(seen)
        if not due and start > 0:
            recent = counts - self._checks[start][0]
            figure = _max_mean(recent)
            if figure > self.threshold + self.floor(recent):
                measured, due = figure, True
        middle = self._checks[max(start, 1):] + [(counts, seen)]
        if len(middle) >= self._KEEP:  # every other one, the newest kept
            middle = middle[::-1][::2][::-1]
        self._checks = self._checks[:1] + middle
        return measured, due, False


class Rebalancer:
    """Re-plan and migrate a model's expert-parallel MoE layers as their traffic drifts (module docstring).

    Args:
        layers: every MoE layer of one plan (``ExpertParallelMoE``, layer_index 0..L-1, any order).
        every: re-plan this many steps after the last re-plan (or the start; None: only on the threshold).
        threshold: re-plan when the measured max/mean GPU load since the last check exceeds it by more than
            its sampling noise (``noise_floor`` of the assignments counted; until then the counts accumulate).
        check_every: steps between threshold checks (each is one small all-gather).
        window_tokens: tokens per rank each layer's recorder keeps (the most recent; ``WindowRecorder``).
        max_moves / max_move_bytes / seed / move_target: passed to ``replan`` (move_target: by default its
            ``DEFAULT_MOVE_TARGET``, a soft 15% of the slots per re-plan; None: moves priced only).
        horizon_tokens: passed to ``replan``; None: the tokens the new plan is expected to serve until the
            next re-plan, the tokens routed per step since the last one (all ranks) x ``every`` (or, with only
            a threshold, x the steps since the last re-plan): a move then has to pay for its bytes within
            the interval it serves.
        optimizer: its state of the moved experts moves with them (AdamW, Adam, SGD; any other is refused here).
            Without one, a migration of layers in training mode whose experts require grad warns (their optimizer
            state would stay behind).
    """

    def __init__(self, layers: Sequence[Any], *, every: int | None = None, threshold: float | None = None,
                 check_every: int = 1, window_tokens: int = 8192, max_moves: int | None = None,
                 max_move_bytes: float | None = None, horizon_tokens: float | None = None, seed: int | None = None,
                 optimizer: Any = None, move_target: float | None = DEFAULT_MOVE_TARGET) -> None:
        layers = list(layers)
        if every is None and threshold is None:
            raise DistributedError("Rebalancer needs a trigger: every=N steps and/or threshold=max/mean load")
        if every is not None and not _is_count(every):
            raise DistributedError(f"Rebalancer every (steps between re-plans) must be an integer >= 1, got "
                                   f"{short_repr(every)}")
        if threshold is not None and not is_number(threshold, 1.0):
            raise DistributedError(f"Rebalancer threshold is a max/mean load: a finite number >= 1.0, got "
                                   f"{short_repr(threshold)}")
        if not _is_count(check_every):
            raise DistributedError(f"Rebalancer check_every (steps between threshold checks) must be an integer >= 1, "
                                   f"got {short_repr(check_every)}")
        if not layers:
            raise DistributedError("Rebalancer: no layers given; pass every expert-parallel MoE layer of the model")
        for i, layer in enumerate(layers):
            if not all(hasattr(layer, a) for a in ("comm", "layer_index", "plan", "traffic")):
                raise DistributedError(
                    f"Rebalancer: layers[{i}] ({type(layer).__name__}) is not an expert-parallel MoE layer: initialise "
                    "torch.distributed (a world of one process will do) and compile with a plan: "
                    "moegraph.compile(spec, plan=PLAN)")
        if not _is_count(window_tokens):
            raise DistributedError(f"Rebalancer window_tokens (tokens per rank each layer's window keeps) must be an "
                                   f"integer >= 1, got {short_repr(window_tokens)}")
        from ..planner.replan import check_budget_allows_a_move, check_replan_args

        try:  # refused here, not at the first re-plan (where a refusal only skips it)
            replan_args = check_replan_args(max_moves=max_moves, max_move_bytes=max_move_bytes,
                                            horizon_tokens=horizon_tokens, seed=seed, move_target=move_target)
            check_budget_allows_a_move(layers[0].plan, replan_args.max_moves, replan_args.max_move_bytes)
        except PlanInfeasible as exc:
            raise DistributedError(f"Rebalancer: {exc}") from None
        if optimizer is not None:  # refused here, not at the first re-plan
            from .migrate import movable_optimizer

            movable_optimizer(optimizer, f"{layers[0].rank} (Rebalancer optimizer)")
        plan = layers[0].plan
        idx = sorted(int(layer.layer_index) for layer in layers)
        if idx != list(range(plan.num_layers)):
            raise DistributedError(
                f"Rebalancer needs every MoE layer of the plan (layer_index 0..{plan.num_layers - 1}), got {idx}: the "
                "re-plan reads every layer's traffic")
        other = next((layer for layer in layers if layer.plan.spec_hash != plan.spec_hash), None)
        if other is not None:
            raise DistributedError(
                f"Rebalancer: the layers run plans of different specs (layer {other.layer_index} and layer "
                f"{layers[0].layer_index} differ in {other.plan.spec.differences_shown(plan.spec)}); they must share one plan")
        self.layers = sorted(layers, key=lambda layer: layer.layer_index)
        self._check_one_placement()
        self.every = None if every is None else int(every)
        self.threshold = None if threshold is None else float(threshold)
        self.check_every = int(check_every)
        self.replan_args = {k: v for k, v in replan_args._asdict().items() if k != "max_imbalance"}
        self.optimizer = optimizer
        self._optimizer_given = optimizer is not None  # else a Trainer callback adopts the Trainer's
        self.steps = 0
        self._last_replan = 0  # step of the last re-plan (0: the start)
        self._window_start = 0  # step after which the windows' ``seen`` counts (last emptied, or the resume)
        self.events: list[dict[str, Any]] = []
        for layer in self.layers:
            if layer.recorder is not None and not isinstance(layer.recorder, WindowRecorder):
                warnings.warn(f"Rebalancer: MoE layer {layer.layer_index} was recording its routing; the Rebalancer "
                              "replaces that recorder with its own window (read the old one before, or record with "
                              "gather_trace from the Rebalancer's windows)", stacklevel=2)
        self._recorders = [WindowRecorder(window_tokens) for _ in self.layers]
        for layer, rec in zip(self.layers, self._recorders):
            layer.recorder = rec
        self._excluded = np.zeros(len(self.layers), np.int64)  # assignments computed while paused (``pause``)
        self._paused_at: np.ndarray | None = None  # totals when paused; None: recording
        self._checked = self._counts()  # the threshold check's baseline: counts at the last check or re-plan
        self._check = _LoadCheck(threshold or 1.0, window_tokens, self.layers[0].world_size, len(self.layers))

    @property
    def plan(self):
        return self.layers[0].plan

    def _check_one_placement(self) -> None:
        """Refuse layers that run different placements: each layer runs its own plan's row, and the re-plan, the
        saved plan and ``load_state`` take ``self.plan`` (the first layer's) as every layer's. They part when one
        layer alone was migrated (``layer.apply_plan``, or a loop of them that stopped part way)."""
        plan = self.plan
        for layer in self.layers[1:]:
            i = int(layer.layer_index)
            if layer.plan is not plan and not np.array_equal(layer.plan.physical_to_logical_map[i],
                                                             plan.physical_to_logical_map[i]):
                raise DistributedError(
                    f"rank {layer.rank}: Rebalancer: MoE layer {i} runs another placement than the plan of MoE layer "
                    f"{self.layers[0].layer_index} says for it (one layer was migrated alone); move every layer to one "
                    "plan first: moegraph.distributed.apply_plan(layers, plan, optimizer) on every rank")

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """``step()``, so that the Rebalancer can be passed where a training callback is expected."""
        return self.step()

    def as_trainer_callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that calls ``step()`` at every ``on_step_end`` (after the optimizer
        step and ``zero_grad``). Without an optimizer of its own, the Rebalancer moves the state of the
        Trainer's (the one each ``train`` passes; accelerate's wrapper is looked through). It records only between
        ``on_step_begin`` and ``on_step_end`` (``pause`` / ``resume``): the evaluation a Trainer runs before
        training or after a step stays out of the window. At ``on_save`` it writes ``save_state`` into the
        checkpoint folder: to resume, compile the layers with that folder's plan and call ``load_state`` on the
        new Rebalancer.

        Layers expert-parallel over several processes are refused here: a Trainer launched on several processes
        trains data-parallel (``DistributedDataParallel``, which the Trainer wraps before any callback runs,
        broadcasts rank 0's parameters over every rank's, and expert-parallel ranks hold different experts; it
        averages their gradients) and checkpoints rank 0's weights and optimizer state alone. Expert-parallel
        training across processes is a loop of your own (README)."""
        if self.layers[0].world_size > 1:
            raise DistributedError(
                f"rank {self.layers[0].rank}: Rebalancer.as_trainer_callback: the layers are expert-parallel over "
                f"{self.layers[0].world_size} processes, and a Hugging Face Trainer on several processes trains "
                "data-parallel: the DistributedDataParallel it wraps the model in (before any callback runs) would "
                "overwrite every rank's expert slots with rank 0's and average their gradients, and its checkpoints "
                "keep rank 0's experts and optimizer state only. Train expert-parallel layers across processes in a "
                "loop of your own (backward, layer.sync_grads(), optimizer step, zero_grad, rb.step(); each rank "
                "saves its own state_dict and optimizer state, and every rank rb.save_state)")
        return self._trainer_callback()

    def _trainer_callback(self) -> Any:
        """``as_trainer_callback`` without its check of the world (the callback's mechanics, for the tests)."""
        try:
            from transformers import TrainerCallback
        except ImportError as exc:  # transformers is optional
            raise DistributedError("Rebalancer.as_trainer_callback needs transformers (pip install transformers); "
                                   "in a plain training loop call rb.step() after each optimizer step") from exc
        rebalancer = self

        def adopt(optimizer: Any) -> None:
            if rebalancer._optimizer_given or optimizer is None:  # else the Trainer's, at each train
                return
            from .migrate import movable_optimizer

            try:
                optimizer, _ = movable_optimizer(optimizer, rebalancer.layers[0].rank)  # accelerate's wrapper unwrapped
            except DistributedError as exc:
                raise DistributedError(
                    f"{exc}. In a Trainer: train with one of those (TrainingArguments(optim='adamw_torch'), or "
                    "optimizers=(torch.optim.AdamW(...), None)), or give the Rebalancer the optimizer it moves "
                    "(Rebalancer(..., optimizer=...)) before as_trainer_callback()") from None
            rebalancer.optimizer = optimizer

        class RebalanceCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                adopt(kwargs.get("optimizer"))  # a state that cannot move is refused before the first step
                rebalancer.pause()  # an evaluation before the first step (eval_on_start) is not training traffic

            def on_step_begin(self, args, state, control, **kwargs):
                rebalancer.resume()

            def on_save(self, args, state, control, **kwargs):
                # the checkpoint folder the Trainer just wrote: the running plan beside its optimizer state
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    rebalancer.save_state(folder)

            def on_step_end(self, args, state, control, **kwargs):
                adopt(kwargs.get("optimizer"))
                rebalancer.step()
                rebalancer.pause()  # the evaluation the Trainer may run next is not training traffic

        return RebalanceCallback()

    def save_state(self, folder: str | Path) -> None:
        """Write, into ``folder`` beside a checkpoint, each rank's windows (``STATE_WINDOWS``, every rank its own) and,
        from rank 0, the running plan (``STATE_PLAN``) and the Rebalancer's counters and events (``STATE_FILE``, last).
        Every rank calls it; not a collective. An optimizer's state is per slot: a checkpoint of it resumes
        correctly only under the plan it was saved with, which is this one."""
        folder = Path(folder)
        self._check_one_placement()  # the plan saved is every layer's
        layer = self.layers[0]
        windows = {f"{key}_{i}": value for i, rec in enumerate(self._recorders) for key, value in rec.snapshot().items()}
        write_atomically(folder / STATE_WINDOWS.format(rank=layer.rank, world=layer.world_size),
                         lambda tmp: np.savez(tmp, **windows), "Rebalancer windows", DistributedError)
        if layer.rank != 0:
            return
        state = {"format": "moegraph-rebalancer", "version": 1, "steps": self.steps, "last_replan": self._last_replan,
                 "events": _plain(self.events),
                 "windows": {"world_size": layer.world_size, "since_step": self._window_start}}
        text = json.dumps(state, indent=1, allow_nan=False) + "\n"  # before any file is written
        self.plan.save(folder / STATE_PLAN)
        write_atomically(folder / STATE_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"), "Rebalancer state",
                         DistributedError)

    def load_state(self, folder: str | Path) -> None:
        """Continue from ``save_state``'s files in ``folder`` (every rank reads them; not a collective): the step
        count, the last re-plan's step (``every`` counts on from it), the events, and this rank's windows with the
        step their interval started at (a window file that is missing, of another world size or unreadable leaves
        them empty, with a warning). The layers must run the saved plan (compile them with
        ``plan=Plan.load(folder / STATE_PLAN)``): under another plan the optimizer state saved beside it would
        belong to other experts, so that is refused."""
        from ..planner import Plan

        folder = Path(folder)
        saved = Plan.load(folder / STATE_PLAN, spec=self.plan.spec)
        if not np.array_equal(saved.physical_to_logical_map, self.plan.physical_to_logical_map):
            differ = int((saved.physical_to_logical_map != self.plan.physical_to_logical_map).sum())
            raise DistributedError(
                f"{folder / STATE_PLAN}: the checkpoint was saved under another placement than the layers run "
                f"({differ} slots differ); an optimizer's state is per slot, so compile the layers with "
                f"plan=Plan.load('{folder / STATE_PLAN}') to resume")
        where = folder / STATE_FILE
        check_input(where, "Rebalancer state", DistributedError, 256 << 20)  # its events: kilobytes per re-plan
        try:
            state = json.loads(where.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DistributedError(f"{where}: not found; it is written by Rebalancer.save_state beside the plan") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DistributedError(f"{where}: truncated or corrupt ({type(exc).__name__}: {exc}); resume without it (a "
                                   "new Rebalancer counts from 0)") from None
        ok = (isinstance(state, dict) and state.get("format") == "moegraph-rebalancer"
              and all(is_integer(state.get(k), 0) for k in ("steps", "last_replan"))
              and state["last_replan"] <= state["steps"] and isinstance(state.get("events"), list))
        if not ok:
            raise DistributedError(f"{where}: not a Rebalancer state (format, steps >= last_replan >= 0, events); "
                                   "resume without it (a new Rebalancer counts from 0)")
        if state.get("version") != 1:
            raise DistributedError(f"{where}: Rebalancer state version {state.get('version')!r} is not supported (this "
                                   "moegraph reads version 1); resume without it (a new Rebalancer counts from 0)")
        self.steps, self._last_replan, self.events = state["steps"], state["last_replan"], state["events"]
        self._window_start = self.steps  # the windows count the tokens from here (the rate of tokens per step)
        restored = self._restore_windows(folder, state.get("windows"))
        if restored is not None:
            self._window_start = restored
        self._checked = self._counts()
        self._check.reset()

    def _restore_windows(self, folder: Path, saved: Any) -> int | None:
        """This rank's windows from ``save_state``'s file, and the step their counts start at; None (windows left
        empty, with a warning where the state says they were saved) when there is none this Rebalancer can take."""
        layer = self.layers[0]
        if not isinstance(saved, dict):  # a state written before the windows were saved
            return None
        since = saved.get("since_step")
        where = folder / STATE_WINDOWS.format(rank=layer.rank, world=layer.world_size)
        problem = None
        if saved.get("world_size") != layer.world_size:
            problem = f"they were saved by {saved.get('world_size')!r} ranks, this run has {layer.world_size}"
        elif not is_integer(since, 0, self.steps):
            problem = f"{folder / STATE_FILE} gives no step they start at"
        else:
            problem = self._read_windows(where)
        if problem is not None:
            warnings.warn(f"Rebalancer.load_state: the windows are not restored ({problem}); they start empty, so the "
                          "first re-plan reads only the tokens routed from here", stacklevel=3)
            return None
        return since

    def _read_windows(self, where: Path) -> str | None:
        """Restore every layer's window from ``where``; why not (nothing restored), or None."""
        try:
            check_input(where, "Rebalancer windows", DistributedError, 1 << 34)
            with np.load(where, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except DistributedError as exc:
            return str(exc)
        except FileNotFoundError:
            return f"{where} is missing"
        except (OSError, ValueError, EOFError) as exc:  # np.load of a truncated or foreign file
            return f"{where} is truncated or corrupt ({type(exc).__name__}: {exc})"
        parts = []
        for i, layer in enumerate(self.layers):
            ids, samples, counters = (arrays.get(f"{key}_{i}") for key in ("ids", "samples", "counters"))
            k, choices = layer.TOP_K, layer.router_choices
            shaped = (ids is not None and samples is not None and counters is not None and ids.ndim == 2
                      and len(ids) == len(samples) and counters.shape == (2,))
            ids_ok = shaped and (len(ids) == 0 or (ids.shape[1] == k and ids.min() >= -1 and ids.max() < choices))
            if not ids_ok:
                return f"{where} does not hold windows of these {len(self.layers)} layers (top-{k} of {choices} ids)"
            parts.append((ids, samples, counters))
        if len(arrays) != 3 * len(self.layers):
            return f"{where} holds windows of another number of layers"
        for layer, rec, (ids, samples, counters) in zip(self.layers, self._recorders, parts):
            rec.restore(ids, samples, counters, layer.experts.down_proj.device)
        return None

    def pause(self) -> None:
        """Stop recording forwards into the windows (this rank; not a collective) until ``resume``: traffic that the
        plan should not follow, such as evaluation between training steps. The threshold check leaves it out too."""
        for rec in self._recorders:
            rec.paused = True
        if self._paused_at is None:
            self._paused_at = self._totals()

    def resume(self) -> None:
        """Record forwards again after ``pause``."""
        for rec in self._recorders:
            rec.paused = False
        if self._paused_at is not None:
            self._excluded += self._totals() - self._paused_at
            self._paused_at = None

    def _totals(self) -> np.ndarray:
        """[L] (token, expert) assignments this rank's experts computed per layer, never reset (``computed_total``:
        ``layer.reset_traffic()`` does not disturb the checks)."""
        return np.array([layer.traffic.computed_total for layer in self.layers], np.int64)

    def _counts(self) -> np.ndarray:
        """``_totals`` less those computed while paused: the traffic the threshold check judges."""
        totals = self._totals()
        return totals - self._excluded - (0 if self._paused_at is None else totals - self._paused_at)

    def _gather(self, since: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(assignments each rank's experts computed since its counts ``since`` [W, L] (default: at the check's
        baseline), tokens each rank's window recorded since it was emptied [W], this rank's counts now [L]).
        Collective (one small all-gather)."""
        now = self._counts()
        since = self._checked if since is None else since
        mine = torch.as_tensor(np.append(now - since, self._recorders[0].seen), dtype=torch.int64,
                               device=self.layers[0].experts.down_proj.device)
        got = torch.stack(self.layers[0].comm.all_gather(mine, "Rebalancer load check")).cpu().numpy()  # [W, L + 1]
        return got[:, :-1], got[:, -1], now

    def measured_imbalance(self) -> float:
        """Mean over layers of the max/mean (token, expert) assignments computed per rank since the last threshold
        check (or re-plan, or the start): the figure the next check judges (with that of the last window's tokens), as
        the runtime counted it. Reads only: calling it (to log the balance) does not move the check's baseline.
        Collective."""
        return _max_mean(self._gather()[0])

    def _repair_recorders(self) -> None:
        """Put back the Rebalancer's window on a layer whose recorder was replaced (``start_recording`` /
        ``stop_recording`` after the Rebalancer started), with a warning: the re-plans read these windows."""
        for layer, rec in zip(self.layers, self._recorders):
            if layer.recorder is not rec:
                warnings.warn(f"Rebalancer: MoE layer {layer.layer_index}'s recorder was replaced (start_recording / "
                              "stop_recording) while the Rebalancer records its window; the window is back, emptied "
                              "(read the window with gather_trace(rb.layers) instead of recording again)", stacklevel=3)
                rec.clear()
                layer.recorder = rec
                if rec is self._recorders[0]:
                    self._window_start = self.steps

    def step(self) -> dict[str, Any] | None:
        """Count one step; re-plan and migrate if due. Returns the event when it re-planned (or tried to), else
        None. ``every``: that many steps after the last re-plan (whatever triggered it)."""
        self.steps += 1
        self._repair_recorders()
        due = self.every is not None and self.steps - self._last_replan >= self.every
        measured = None
        if not due and self.threshold is not None and self.steps % self.check_every == 0:
            self._check.threshold = self.threshold  # a loop may change it between steps
            counts, seen, now = self._gather()
            measured, due, balanced = self._check.decide(counts, seen)
            if balanced:  # the next check judges fresh counts
                self._checked = now
            # else over the threshold but within sampling noise of it: the counts go on accumulating (up to a
            # window's tokens), so the next check judges more tokens (a smaller floor) instead of noise
        return self.rebalance(measured=measured) if due else None

    def _interval_tokens(self) -> float | None:
        """Tokens (all ranks) expected until the next re-plan: routed per step since the last re-plan x the
        steps between re-plans (``every``, else the steps since the last one). None before any token.
        Collective (one small all-reduce)."""
        rec = self.layers[0].recorder
        seen = torch.tensor([int(getattr(rec, "seen", 0))], dtype=torch.int64,
                            device=self.layers[0].experts.down_proj.device)
        self.layers[0].comm.all_reduce(seen, "Rebalancer tokens since the last re-plan")
        since, counted = self.steps - self._last_replan, self.steps - self._window_start
        if int(seen.item()) == 0 or since < 1 or counted < 1:
            return None
        return float(seen.item()) / counted * (self.every if self.every is not None else since)

    def _agreed_replan(self, current, window, args: dict[str, Any]):
        """Rank 0's re-plan on every rank (the plan file's JSON, broadcast), or the refusal it raised: one answer
        for all ranks, whatever floating point does on each host, and the others skip the work. Collective."""
        import json

        from ..planner import Plan
        from ..planner.replan import replan

        layer = self.layers[0]
        answer, failure = b"", None
        if layer.rank == 0:
            try:
                # one process: a rank shares its host with other ranks
                answer = json.dumps({"plan": replan(None, current, window, processes=1, **args).to_dict()}).encode()
            except (PlanInfeasible, TraceError) as exc:
                answer = json.dumps({"refused": str(exc), "kind": type(exc).__name__}).encode()
            except Exception as exc:  # noqa: BLE001 - told to the other ranks, then raised here
                answer = json.dumps({"failed": f"{type(exc).__name__}: {exc}"}).encode()
                failure = exc
        dev = layer.experts.down_proj.device
        size = layer.comm.broadcast(torch.tensor([len(answer)], dtype=torch.int64, device=dev), 0,
                                    "Rebalancer re-plan (size)")
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
        if layer.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(answer), dtype=torch.uint8))
        got = json.loads(bytes(layer.comm.broadcast(buf, 0, "Rebalancer re-plan").cpu().numpy()))
        if "failed" in got:
            if layer.rank == 0:
                raise failure
            raise DistributedError(f"rank {layer.rank}: the re-plan on rank 0 failed ({got['failed']}); every rank "
                                   "stays on the current plan")
        if "refused" in got:
            raise (PlanInfeasible if got["kind"] == "PlanInfeasible" else TraceError)(got["refused"])
        return Plan.from_dict(got["plan"], spec=current.spec, source="rank 0's re-plan")

    def rebalance(self, measured: float | None = None) -> dict[str, Any]:
        """Gather the window, re-plan from the running plan and apply it on every layer. Collective."""
        from ..planner.cost import evaluate
        from .migrate import apply_plan
        from .trace import gather_trace

        t0 = time.perf_counter()
        self._repair_recorders()
        args = dict(self.replan_args)
        if args["horizon_tokens"] is None:
            args["horizon_tokens"] = self._interval_tokens()
        event: dict[str, Any] = {"step": self.steps, "measured_max_mean": measured, "tokens": 0,
                                 "horizon_tokens": args["horizon_tokens"]}
        try:
            window = gather_trace(self.layers, name=f"window at step {self.steps}")
        except TraceError as exc:  # the same on every rank (checked on the gathered ids): unusable, so started afresh
            return self._done(event, skipped=f"the window could not be read ({exc}); it starts again empty",
                              slots_moved=0, bytes_moved=0, seconds=time.perf_counter() - t0)
        self._check_one_placement()
        current = self.plan
        event["tokens"] = window.num_tokens
        try:
            new = self._agreed_replan(current, window, args)
        except (PlanInfeasible, TraceError) as exc:  # rank 0's refusal, on every rank
            return self._done(event, skipped=str(exc), slots_moved=0, bytes_moved=0, seconds=time.perf_counter() - t0)
        try:
            reports = apply_plan(self.layers, new, optimizer=self.optimizer)  # every layer, or none
        except Exception as exc:
            # Every layer is still on the current plan and the window is kept: the next step may try again.
            event.update(failed=f"{type(exc).__name__}: {exc}", slots_moved=0, bytes_moved=0,
                         seconds=time.perf_counter() - t0)
            self.events.append(event)
            raise
        mig = new.policy["migration"]
        sent = torch.tensor([sum(sum(r["weight_bytes_sent"]) for r in reports),
                             sum(sum(r["state_bytes_sent"]) for r in reports)], dtype=torch.int64,
                            device=self.layers[0].experts.down_proj.device)
        self.layers[0].comm.all_reduce(sent, "Rebalancer bytes moved")
        # bytes_moved: the expert weights every rank sent, the runtime's count; predicted_bytes_moved: the planner's
        # migration in the layers' dtype (the two are equal); state_bytes_moved: the optimizer state that went along
        return self._done(event, slots_moved=mig["slots_moved"], bytes_moved=int(sent[0].item()),
                          predicted_bytes_moved=sum(int(r["predicted_layer_weight_bytes"]) for r in reports),
                          state_bytes_moved=int(sent[1].item()),
                          predicted_max_mean_before=evaluate(current, window)["mean"]["max_mean_load"],
                          predicted_max_mean_after=evaluate(new, window)["mean"]["max_mean_load"],
                          seconds=time.perf_counter() - t0)

    def _done(self, event: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """Close a re-plan that was applied or skipped: record it, and start the next interval (empty windows,
        the threshold's baseline and ``every`` counted from here)."""
        event.update(fields)
        self.events.append(event)
        for rec in self._recorders:
            rec.clear()
        self._last_replan = self._window_start = self.steps
        self._checked = self._counts()
        self._check.reset()
        return event


def drift_demo(layers: Sequence[Any], *, steps: int, every: int, tokens: int, seed: int = 0,
               strength: float = 12.0) -> list[dict[str, Any]]:
    """Inference (the layers are put in eval mode) on a drifting synthetic stream with a
    ``Rebalancer(every=every)``; per step the measured max/mean load and any re-plan. Collective (every rank
    runs it with its own tokens).

    Each layer sees tokens ``x = noise + strength * W_r^T c_t``, with W_r its router weight and c_t a
    preference over experts (a hash-routed layer: token ids drawn in proportion to the preference for the experts
    its table maps them to): one random half of the experts for the first third of the steps, then
    sliding to the other half over the next sixth, then staying there (a topic switch).
    """
    for layer in layers:
        layer.eval()  # inference: no optimizer state to move with the experts
    rb = Rebalancer(layers, every=every, window_tokens=max(tokens * every, 1))
    out = []
    since = rb._counts()
    for step in drift_stream(rb.layers, steps=steps, tokens=tokens, seed=seed, strength=strength):
        counts, _, since = rb._gather(since)
        measured = _max_mean(counts)  # this step's forwards alone
        row = {"step": step + 1, "measured_max_mean": measured}
        ev = rb.step()
        row["event"] = ev
        out.append(row)
    return out


def drift_stream(layers: Sequence[Any], *, steps: int, tokens: int, seed: int = 0,
                 strength: float = 12.0) -> Iterator[int]:
    """``drift_demo``'s topic switch, without a Rebalancer: for each step, one forward of ``tokens`` tokens on
    every layer (inference mode), then the step's index is yielded (for the caller's per-step work). This
    rank's tokens are its own (seeded by ``seed`` and the rank); the preference over experts is the same on
    every rank."""
    rank = layers[0].rank
    e = layers[0].NUM_EXPERTS
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(e, generator=g)
    a, b = torch.zeros(e), torch.zeros(e)
    a[perm[: e // 2]], b[perm[e // 2:]] = 1.0, 1.0
    gr = torch.Generator().manual_seed(seed * 1000 + 7 + rank)
    for step in range(steps):
        w = min(max((step - steps / 3) / max(steps / 6, 1), 0.0), 1.0)
        pref = (1 - w) * a + w * b
        with torch.inference_mode():
            for layer in layers:
                if layer.NEEDS_TOKEN_IDS:  # hash routing picks experts by token id: ids the preference favours
                    table = _hash_experts(layer)
                    weight = pref[table].sum(dim=-1) + 1e-3  # [ids]; every id stays possible
                    ids = torch.multinomial(weight, tokens, replacement=True, generator=gr) if tokens else \
                        torch.zeros(0, dtype=torch.int64)
                    dev = layer.experts.down_proj.device
                    x = torch.randn(tokens, layer.HIDDEN, generator=gr)
                    layer(x.to(dev, layer.compute_dtype), token_ids=ids.to(dev))
                    continue
                router = layer.router.weight.detach().float()
                x = torch.randn(tokens, layer.HIDDEN, generator=gr) + strength * (pref @ router)
                layer(x.to(router.device, layer.compute_dtype))  # FP8 experts compute in their activation dtype
        yield step


def _hash_experts(layer: Any) -> torch.Tensor:
    """[ids, K] the experts a hash-routed layer sends each token id to (on the host): its table, or for the
    modulo method the ids 0..E-1 through its formula (``semantics.routing.modulo_hash_experts``), which covers
    every pattern."""
    table = getattr(layer.router, "hash_table", None)
    if table is not None:
        return table.long().cpu()
    return modulo_hash_experts(torch.arange(layer.NUM_EXPERTS), layer.NUM_EXPERTS, layer.TOP_K)


def _is_count(value: Any) -> bool:
    """An integer >= 1 (numpy's too; not a bool, a float or a string)."""
    return is_integer(value, 1)


def _plain(value: Any) -> Any:
    """``value`` (events: dicts, lists, numbers, strings) as plain JSON: numpy and torch values as Python numbers
    or lists, a non-finite float as None (JSON has neither NaN nor infinity), anything else as its text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
