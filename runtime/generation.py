"""Write a new generation of graphs beside the live one and switch the manifest last.

A stage that replaces graphs (``export --force``) writes every new file under ``ART/.uniref-gen-<id>/`` with the
same relative paths it will finally have. ``commit`` then:

1. saves a manifest whose new graphs point into the staging folder: the switch (one atomic rename);
2. hard-links each staged file over its final name (data files before their graph);
3. saves the manifest with the final names, moves the other staged files (reports) into place, and removes
   the files of graphs the new manifest no longer lists, then the staging folder.

A run killed before step 1 leaves the old artifact untouched; one killed after it leaves a manifest whose every
file is complete. The leftovers are removed by the next write stage (``runtime/locking.py``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ManifestError
from .fileio import temp_name
from .locking import STAGING_PREFIX
from .manifest import GraphSpec, Manifest


class Staging:
    """A staging folder inside ``art_dir`` for one run of ``stage``; write new files under ``root``."""

    def __init__(self, art_dir: str | os.PathLike, stage: str):
        self.art = Path(art_dir)
        self.root = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{stage}-", dir=self.art))
        try:
            self.old_files = _graph_files(Manifest.load(self.art))
        except ManifestError:  # none yet, or unreadable: nothing of it to remove later
            self.old_files = set()

    def _staged(self, g: GraphSpec) -> bool:
        return (self.root / g.file).is_file()

    def commit(self, manifest: Manifest) -> Manifest:
        """Switch ``art_dir`` to ``manifest`` (graph files relative to the final folder); returns it."""
        rel = self.root.name
        staged = [g for g in manifest.graphs if self._staged(g)]
        switched = manifest
        for g in staged:
            switched = switched.with_graph(dataclasses.replace(
                g, file=f"{rel}/{g.file}", external_data=f"{rel}/{g.external_data}" if g.external_data else None))
        switched.save(self.art)  # 1. the switch
        for g in staged:  # 2. final names (the live manifest does not reference them now)
            for f in ([g.external_data] if g.external_data else []) + [g.file]:
                _link_over(self.root / f, self.art / f)
        manifest.save(self.art)  # 3. final manifest
        done = {f for g in staged for f in (g.file, g.external_data) if f}
        for staged_file in sorted(self.root.rglob("*")):
            r = str(staged_file.relative_to(self.root))
            if staged_file.is_file() and r not in done:
                (self.art / r).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged_file, self.art / r)
        for f in self.old_files - _graph_files(manifest):
            (self.art / f).unlink(missing_ok=True)
        self.discard()
        return manifest

    def discard(self) -> None:
        """Remove the staging folder (the live artifact is untouched)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _graph_files(manifest: Manifest) -> set[str]:
    return {f for g in manifest.graphs for f in (g.file, g.external_data) if f}


def _link_over(src: Path, dst: Path) -> None:
    """Make ``dst`` the same content as ``src`` atomically: a hard link (copy where links fail) then a rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f"{temp_name(dst.name)}link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
