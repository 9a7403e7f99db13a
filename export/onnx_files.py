"""Saving and moving ONNX graphs whose weights may live in an external data file (``<graph>.onnx.data``).

An external data file is found through the ``location`` recorded in every initializer, so the data file must
carry the name the graph was saved with: ``save_graph`` writes both under their final names in a temporary
folder and renames them into place (data first, so a graph never points at a missing file); ``move_graph``
renames a graph and rewrites those locations to match its new name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

from uniref_deploy.runtime.fileio import atomic_path, make_temp_dir, sha256_file

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's hard limit; larger graphs keep weights in <file>.data


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in ``model`` (external ones counted by their recorded length)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def data_file(path: Path) -> Path:
    """The external data file that belongs to graph ``path``."""
    return path.with_name(path.name + ".data")


def external_data_record(root: Path, rel: str) -> tuple[str | None, dict]:
    """For graph ``root / rel``: its external data file relative to ``root`` (None without one) and the manifest
    ``info`` fields that pin it (sha256, bytes)."""
    data = data_file(root / rel)
    if not data.is_file():
        return None, {}
    return rel + ".data", {"external_data_sha256": sha256_file(data), "external_data_bytes": data.stat().st_size}


def move_into_place(tmp_dir: Path, path: Path) -> None:
    """Rename the files of ``tmp_dir`` next to ``path``: data files first, then the graph ``path.name``, so a
    graph never points at a missing file."""
    for f in tmp_dir.iterdir():
        if f.name != path.name:
            os.replace(f, path.parent / f.name)
    os.replace(tmp_dir / path.name, path)


def save_graph(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> None:
    """Save ``model`` atomically at ``path``; weights go to ``<path>.data`` when ``external`` (None: when they
    come near the protobuf limit). A stale data file of an earlier save is removed when none is written."""
    path = Path(path)
    if external is None:
        external = initializer_bytes(model) > 0.9 * EXTERNAL_DATA_THRESHOLD
    tmp_dir = make_temp_dir(path)
    try:
        tmp = tmp_dir / path.name
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file(path).name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        move_into_place(tmp_dir, path)
        if not external:
            data_file(path).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def move_graph(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move graph ``src`` (and its external data, if any) to ``dst``, re-pointing the data locations."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not data_file(src).is_file():
        shutil.move(str(src), str(dst))
        return
    proto = onnx.load(str(src), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = data_file(dst).name
    shutil.move(str(data_file(src)), str(data_file(dst)))
    with atomic_path(dst) as tmp:
        onnx.save_model(proto, str(tmp))
    src.unlink()
