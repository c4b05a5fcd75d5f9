"""Closed forms of airbench94's schedules and TTA weights, and the parity harness's checks and table."""

import dataclasses
import math

import numpy as np

# airbench94's published hyperparameters, as its paper (arXiv:2404.00498) and code state them; the harness
# checks each one against the reference file it runs.
REFERENCE_EPOCHS = 9.9
REFERENCE_BATCH = 1024
REFERENCE_WARMUP_SHARE = 0.23
REFERENCE_START_FACTOR, REFERENCE_END_FACTOR = 0.2, 0.07
REFERENCE_LOOKAHEAD_EVERY, REFERENCE_LOOKAHEAD_DECAY = 5, 0.95
REFERENCE_WHITEN_BIAS_EPOCHS = 3
# Multi-crop TTA: the image and its mirror image weigh 1/4 each; the four 1-pixel-shifted views 1/8 each.
TTA_VIEW_WEIGHTS = (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)


def reference_total_steps(train_examples: int = 50_000, batch: int = REFERENCE_BATCH,
                          epochs: float = REFERENCE_EPOCHS) -> int:
    """Steps in an airbench94 run: whole batches per epoch (the last partial one dropped), times 9.9, rounded up."""
    return math.ceil(train_examples // batch * epochs)


def reference_lr_factors(total_steps: int) -> np.ndarray:
    """Learning-rate factor of each step 0..total-1: linear 0.2 -> 1 over the first 23%, then 1 -> 0.07."""
    steps = np.arange(total_steps, dtype=np.float64)
    warmup = int(total_steps * REFERENCE_WARMUP_SHARE)
    rising = REFERENCE_START_FACTOR + (1 - REFERENCE_START_FACTOR) * steps / warmup
    falling = 1 + (REFERENCE_END_FACTOR - 1) * (steps - warmup) / (total_steps - warmup)
    return np.where(steps < warmup, rising, falling)


def reference_lookahead(total_steps: int) -> list[tuple[int, float]]:
    """(step, decay) of every Lookahead update: every 5th step on a cubic ramp, then a final one with decay 1."""
    every, decay = REFERENCE_LOOKAHEAD_EVERY, REFERENCE_LOOKAHEAD_DECAY
    updates = [(step, decay ** every * (step / total_steps) ** 3) for step in range(every, total_steps + 1, every)]
    return updates + [(total_steps, 1.0)]


def combine_views(view_values: np.ndarray) -> np.ndarray:
    """The TTA average of per-view values [6, N, classes] (order: image, mirror, then the two shifts' pairs)."""
    return np.tensordot(np.asarray(TTA_VIEW_WEIGHTS), view_values, axes=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclasses.dataclass
class Check:
    """One row of the parity table: how far ours is from the reference, against a stated tolerance.

    `status` is "pass" or "mismatch" when there is a tolerance, "info" for measurements that have none
    (precision effects); `note` says what was compared and, for a mismatch, what differs.
    """

    name: str
    max_abs: float
    max_rel: float
    tolerance: float | None
    note: str = ""
    # By default the relative difference is judged; some checks (counts, exact settings) judge the absolute one.
    judge: str = "rel"

    @property
    def status(self) -> str:
        if self.tolerance is None:
            return "info"
        value = self.max_rel if self.judge == "rel" else self.max_abs
        return "pass" if np.isfinite(value) and value <= self.tolerance else "mismatch"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "status": self.status}


def compare(name: str, ours, reference, tolerance: float | None, note: str = "", judge: str = "rel") -> Check:
    """Max absolute difference, and that difference relative to the reference's largest magnitude."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        return Check(name, math.inf, math.inf, tolerance, f"shapes differ: ours {ours.shape}, reference "
                     f"{reference.shape}. {note}".strip(), judge)
    max_abs = float(np.max(np.abs(ours - reference))) if ours.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return Check(name, max_abs, max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf), tolerance, note,
                 judge)


def table(checks: list[Check]) -> str:
    """The checks as a Markdown table."""
    rows = ["| Check | Max abs diff | Max rel diff | Tolerance | Result |", "|---|---|---|---|---|"]
    for check in checks:
        tolerance = "–" if check.tolerance is None else f"{check.judge} ≤ {check.tolerance:.0e}"
        rows.append(f"| {check.name} | {check.max_abs:.3g} | {check.max_rel:.3g} | {tolerance} | {check.status} |")
    return "\n".join(rows)
