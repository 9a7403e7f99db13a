"""The manifest's ``text`` record (the exported prompt encoder's host files): round trip and file checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from uniref_deploy.runtime.errors import ManifestError
from uniref_deploy.runtime.fileio import sha256_file
from uniref_deploy.runtime.manifest import Manifest, ModelConfig


def _manifest(art: Path) -> Manifest:
    (art / "text").mkdir(parents=True)
    (art / "text" / "tokenizer.json").write_text('{"model": {}}')
    (art / "text" / "config.json").write_text("{}")
    files = {f"text/{f.name}": sha256_file(f) for f in (art / "text").iterdir()}
    config = ModelConfig("qwen-image", {"in_channels": 64, "out_channels": 16}, {"z_dim": 16}, {})
    return Manifest(config).with_text({"dir": "text", "files": files, "vision_max_patches": 4096,
                                       "max_text_len": 1088})


def test_text_record_round_trips_and_is_verified(tmp_path: Path):
    manifest = _manifest(tmp_path)
    manifest.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded.text == manifest.text
    loaded.verify_files(tmp_path)
    assert {rel for rel, status in loaded.file_status(tmp_path) if status == "ok"} == set(manifest.text["files"])


@pytest.mark.parametrize("damage", ["edit", "delete"])
def test_a_damaged_text_file_fails_verification(tmp_path: Path, damage: str):
    manifest = _manifest(tmp_path)
    target = tmp_path / "text" / "tokenizer.json"
    target.write_text("{}") if damage == "edit" else target.unlink()
    with pytest.raises(ManifestError, match="tokenizer.json"):
        manifest.verify_files(tmp_path)
    assert dict(manifest.file_status(tmp_path))["text/tokenizer.json"] == ("damaged" if damage == "edit" else "missing")


def test_manifests_without_text_load_with_none(tmp_path: Path):
    manifest = _manifest(tmp_path).with_text(None)
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path).text is None
