"""Where a search's Optuna study lives: a journal file, kept locally while the search runs and published beside the
experiment (on any storage) for optuna-dashboard, report.html and --resume."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import optuna

from distributed import storage


class StudyFiles:
    """Where the Optuna study lives. SQLite cannot live on object storage, so the study is an Optuna journal
    (JournalStorage + JournalFileBackend) in a local working file. The searcher's checkpoint carries the study in
    the same file (tune.DivergenceAwareOptunaSearch.save), so a --resume restores a study that agrees with the
    searcher state even when the driver died while Tune uploaded its files one by one; a copy goes to
    <exp>/optuna.journal in Tune's same upload (for optuna-dashboard), and the end of a search publishes the final
    study there. --resume first fetches that copy (for Tune's unpickling of the tuner), then the searcher's own
    replaces it. A local experiment keeps its working file beside it."""

    def __init__(self, exp: str):
        self.published = storage.join(exp, "optuna.journal")
        if storage.is_uri(exp):
            key = hashlib.sha1(exp.encode()).hexdigest()[:16]
            self.working = os.path.join(tempfile.gettempdir(), "emotune-optuna", key, "optuna.journal")
        else:
            self.working = os.path.join(exp, ".optuna-working.journal")

    def storage(self):
        from optuna.storages.journal import JournalFileBackend

        os.makedirs(os.path.dirname(self.working), exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(self.working))

    def publish(self) -> None:
        if os.path.exists(self.working):
            storage.upload(self.working, self.published)

    def restore(self, journal: bytes) -> None:
        """The study saved with the searcher state becomes the working file."""
        storage.write_atomic(self.working, journal)

    def snapshot(self, staging_dir: str) -> None:
        if os.path.exists(self.working):
            storage.write_atomic(os.path.join(staging_dir, "optuna.journal"), Path(self.working).read_bytes())

    def fresh(self) -> None:
        """A new search starts from an empty study: a working file left by an earlier search of the same location
        (its path is derived from the location, so a restored searcher finds it) must not leak trials into it."""
        if os.path.exists(self.working):
            os.remove(self.working)

    def fetch(self) -> None:
        """The working file becomes the published study: trials asked after the last saved state are dropped,
        exactly as Tune drops them, so nothing is left RUNNING or counted twice."""
        if os.path.exists(self.working):
            os.remove(self.working)
        if storage.is_file(self.published):
            storage.download(self.published, self.working)
