"""Who each training image shows (cfg.group_by), so validation can keep each person on one side: from the file
names (`re:REGEX`) or a column of the manifest.csv beside an imagefolder."""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

import numpy as np

from distributed import storage
from distributed.errors import DataError


def read_groups(names: list[str] | None, group_by: str, data: str) -> np.ndarray:
    """cfg.group_by -> one group name per training image. `re:REGEX` is searched in the file name and its first
    capture group (or the whole match) names the group; any other value is a column of the manifest.csv beside
    the imagefolder, matched on the image's path under the folder (the manifest's `path` column). names: the
    training images' paths under the folder (Decoded.train_names; None for data without files)."""
    kind, _, root = data.partition(":")
    if names is None:
        raise DataError(f"group_by={group_by!r}: groups come from file names or a manifest.csv, which only "
                        f"imagefolder data has ({kind} given); remove group_by or use imagefolder:PATH")
    if group_by.startswith("re:"):
        try:
            pattern = re.compile(group_by[3:])
        except re.error as exc:
            raise DataError(f"group_by={group_by!r}: not a regular expression ({exc}); fix the pattern") from None
        found = [pattern.search(Path(n).name) for n in names]
        groups = [(m.group(1) if pattern.groups else m.group(0)) if m else None for m in found]
        missing = [n for n, g in zip(names, groups) if not g]
        if missing:
            what = "none" if len(missing) == len(names) else f"{len(missing)}"
            raise DataError(f"group_by={group_by!r} matches {what} of the {len(names)} training file names "
                            f"(e.g. not {Path(missing[0]).name!r}); every image needs a group: fix the pattern")
    else:
        manifest = storage.join(root if storage.is_uri(root) else os.path.expanduser(root), "manifest.csv")
        if not storage.is_file(manifest):
            raise DataError(f"group_by={group_by!r}: no {manifest} to read that column from; add one (columns path,"
                            f"{group_by}) or group by file name with group_by: 're:REGEX'")
        reader = csv.DictReader(io.StringIO(storage.read_text(manifest), newline=""))
        columns = reader.fieldnames or []
        for column in ("path", group_by):
            if column not in columns:
                raise DataError(f"{manifest}: no {column!r} column (columns: {', '.join(columns)}); "
                                f"set group_by to one of them, or to 're:REGEX' on file names")
        table = {row["path"]: row[group_by] for row in reader}
        groups = [table.get(n) for n in names]
        missing = [n for n, g in zip(names, groups) if not g]
        if missing:
            raise DataError(f"{manifest}: {len(missing)} training images have no {group_by!r} (e.g. {missing[0]}); "
                            f"add their rows (path relative to the folder)")
    return np.array(groups, dtype=str)
