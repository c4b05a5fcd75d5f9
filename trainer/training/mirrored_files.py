"""Which files of a gs:// run's working copy the mirror sends, and in what order; which ones a resumed run
fetches; which remote checkpoints it deletes."""

import os
import re

CHECKPOINT_STATE = "checkpoint"
# Scratch files of the trainer that are never mirrored: non-chief checkpoint directories, checkpoints being
# written, staging exports, temporary JSON/PNG files and write probes.
SKIPPED = re.compile(r"(^|/)(\.worker-\d+-temp|ckpt-\d+_temp[^/]*|export\.partial|\.tmp-[^/]*"
                     r"|\.write-check-[^/]*)(/|$)")
# Sent last in each pass, so the bucket never names what has not arrived: the checkpoint state file names the
# checkpoint files, and metrics.json marks a finished run whose export is already there.
SENT_LAST = ("metrics.json", CHECKPOINT_STATE)


def in_nested_root(local: str, relative: str, all_locals: list[str]) -> bool:
    """Whether a file of the root at `local` lies in another root inside it, which then mirrors it."""
    path = os.path.join(local, relative)
    inner = [other for other in all_locals if other.startswith(local.rstrip("/") + "/")]
    return any(path.startswith(other.rstrip("/") + "/") for other in inner)


def files_to_send(local: str, all_locals: list[str]) -> list[str]:
    """The root's files to mirror, SENT_LAST files at the end."""
    found = []
    for directory, subdirectories, files in os.walk(local):
        for name in sorted(files):
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, local).replace(os.sep, "/")
            if not SKIPPED.search(relative) and not in_nested_root(local, relative, all_locals):
                found.append(path)
    return sorted(found, key=lambda path: os.path.basename(path) in SENT_LAST)


def wanted_for_restore(local: str, relative: str, all_locals: list[str]) -> bool:
    """Top-level JSON and checkpoint state, and every kept checkpoint (not just the newest, so that a damaged
    one can be skipped for an older one: see checkpoints.CheckpointStore.restore_latest)."""
    if "/" in relative or in_nested_root(local, relative, all_locals):
        return False
    return (relative.endswith((".json", CHECKPOINT_STATE))
            or bool(re.match(r"ckpt-\d+\.(index|data-)", relative)))


def kept_checkpoints(local: str) -> set[str | None] | None:
    """The checkpoints (ckpt-N) that the local checkpoint state still names; None before the first one."""
    state = os.path.join(local, CHECKPOINT_STATE)
    if not os.path.exists(state):
        return None
    text = open(state).read()
    kept = set(re.findall(r'^all_model_checkpoint_paths: "([^"]+)"', text, re.M))
    latest = re.search(r'^model_checkpoint_path: "([^"]+)"', text, re.M)
    kept.add(latest.group(1) if latest else None)
    return kept


def is_dropped_checkpoint(relative: str, kept: set[str | None]) -> bool:
    """Whether a remote file belongs to a top-level checkpoint that the local state no longer names."""
    match = re.match(r"(ckpt-\d+)\.", relative)
    return bool(match) and "/" not in relative and match.group(1) not in kept
