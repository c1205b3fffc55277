"""Finished-epoch training checkpoints in a local work directory, so a killed or retried training resumes.

ckpt-<epoch>/ holds the full training state (written by Keras into `state.weights.h5`), the best
classifier weights so far (best.npz) and progress.json. Each is written under a temporary name
and renamed, and the previous one is kept, so a run killed at any moment resumes from its last
complete epoch. tasks.model receives a CheckpointDir and never touches files itself.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

PREFIX = "ckpt-"
STATE = "state.weights.h5"


class CheckpointDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.path)

    def _checkpoints(self) -> list[Path]:
        """Finished-epoch checkpoints, newest first."""
        return sorted((p for p in self.path.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)

    def save(self, epoch: int, write_state: Callable[[Path], None], best: list[np.ndarray] | None, progress: dict) -> None:
        """Checkpoint `epoch`: write_state(path) writes the training state; best = new best weights, or None
        to keep the previous checkpoint's."""
        staging = self.path / f".{PREFIX}tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_state(staging / STATE)
        previous = self._checkpoints()
        if best is not None:
            np.savez(staging / "best.npz", *best)
        elif previous and (previous[0] / "best.npz").exists():
            try:  # a hard link: the best weights are not rewritten every epoch
                os.link(previous[0] / "best.npz", staging / "best.npz")
            except OSError:
                shutil.copyfile(previous[0] / "best.npz", staging / "best.npz")
        (staging / "progress.json").write_text(json.dumps(progress))
        target = self.path / f"{PREFIX}{epoch:04d}"
        shutil.rmtree(target, ignore_errors=True)  # only ever an unreadable one we resumed past
        os.rename(staging, target)
        for old in previous[1:]:  # keep the newest two: the new one and its predecessor
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, read_state: Callable[[Path], None], log) -> dict:
        """Load the newest loadable checkpoint with read_state(path); its progress (with "name"), {} if none."""
        for ckpt in self._checkpoints():
            try:
                progress = json.loads((ckpt / "progress.json").read_text())
                read_state(ckpt / STATE)
            except Exception as exc:  # noqa: BLE001 - a torn checkpoint: fall back to the previous one
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", ckpt.name, exc)
                shutil.rmtree(ckpt, ignore_errors=True)
                continue
            return {**progress, "name": ckpt.name}
        return {}

    def best_weights(self) -> list[np.ndarray] | None:
        """The best epoch's classifier weights from the newest checkpoint, or None."""
        final = self._checkpoints()
        if not final or not (final[0] / "best.npz").exists():
            return None
        with np.load(final[0] / "best.npz") as best:
            return [best[f"arr_{i}"] for i in range(len(best.files))]
