"""Tests for export/lean.py: meta-device tracing + safetensors streamed into the graph's external data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import torch  # noqa: E402

from uniref_deploy.export.lean import (  # noqa: E402
    SafetensorsEntry,
    checkpoint_index,
    export_dit_lean,
    stream_tensors,
)
from uniref_deploy.export.qwen_image import QwenImageDitForExport  # noqa: E402
from uniref_deploy.export.samples import dit_sample  # noqa: E402
from uniref_deploy.runtime.graphs import dit_io  # noqa: E402
from uniref_deploy.runtime.manifest import ModelConfig  # noqa: E402
from uniref_deploy.runtime.packing import pack_references  # noqa: E402

SMALL = dict(num_layers=2, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, in_channels=16,
             out_channels=4, axes_dims_rope=(8, 12, 12), patch_size=2)


def _save(tmp: Path, dtype: torch.dtype, layers: int = 2) -> tuple[Path, ModelConfig, torch.nn.Module]:
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel.from_config({**SMALL, "num_layers": layers}).eval()
    # several shards + index json, as large diffusers checkpoints are stored
    transformer.to(dtype).save_pretrained(tmp / "transformer", max_shard_size="300KB")
    config = ModelConfig("qwen-image", dict(transformer.config), {"z_dim": 16}, {})
    return tmp, config, transformer


def _external(path: Path) -> dict[str, tuple[int, int, onnx.TensorProto]]:
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if init.data_location == onnx.TensorProto.EXTERNAL:
            assert ext["location"] == path.name + ".data"
            out[init.name] = (int(ext["offset"]), int(ext["length"]), init)
    return out


@pytest.mark.slow  # exports a DiT (30-45 s on 2 busy cores)
def test_lean_fp32_graph_matches_torch(tmp_path: Path) -> None:
    model_dir, config, transformer = _save(tmp_path / "model", torch.float32)
    assert len(list((model_dir / "transformer").glob("*.safetensors"))) > 1
    stats = export_dit_lean(model_dir, tmp_path / "art" / "dit.onnx", config, dtype="fp32")
    assert stats["initializers"] > 0 and stats["data_bytes"] >= stats["streamed_bytes"]
    ext = _external(tmp_path / "art" / "dit.onnx")
    assert len(ext) == stats["initializers"]

    inputs, _ = dit_io(config)
    names = [s.name for s in inputs]
    layout = pack_references([(96, 64)], 128 * 96, policy="per-image", width=64, height=64)
    sample = dit_sample(config, layout, 9, pad=2, batch=2, seed=3)
    with torch.no_grad():
        ref = QwenImageDitForExport(transformer).eval()(*(torch.from_numpy(sample.feeds[n]) for n in names)).numpy()
    sess = ort.InferenceSession(str(tmp_path / "art" / "dit.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: sample.feeds[n] for n in names})[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.slow  # exports a DiT (30-45 s on 2 busy cores)
def test_lean_bf16_streams_checkpoint_bytes_exactly(tmp_path: Path) -> None:
    model_dir, config, _ = _save(tmp_path / "model", torch.bfloat16, layers=1)
    out = tmp_path / "art" / "dit.onnx"
    stats = export_dit_lean(model_dir, out, config, dtype="bf16")
    ckpt = checkpoint_index(model_dir / "transformer")
    ext = _external(out)
    data = (out.parent / "dit.onnx.data").read_bytes()
    mapped = set()
    for name, (offset, length, init) in ext.items():
        key = name.split("transformer.", 1)[1]  # IOCast(inner) -> QwenImageDitForExport(transformer) -> key
        entry = ckpt[key]
        assert init.data_type == onnx.TensorProto.BFLOAT16 and tuple(init.dims) == entry.shape
        assert offset % 4096 == 0
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            assert data[offset:offset + length] == f.read(entry.nbytes), key
        mapped.add(key)
    # every checkpoint tensor the graph uses is streamed; the rest (last block's text stream) is dead in the graph
    assert len(mapped) == stats["initializers"]
    assert all(".txt_mlp." in k or "to_add_out" in k or "add_" in k or "norm_added" in k or "txt_mod" in k
               for k in set(ckpt) - mapped)


def test_stream_tensors_converts_and_consumes(tmp_path: Path) -> None:
    import ml_dtypes

    values = np.linspace(-3, 3, 3000, dtype=np.float32).reshape(30, 100)
    raw = values.astype(ml_dtypes.bfloat16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [30, 100], "data_offsets": [0, len(raw)]}}).encode()
    shard = tmp_path / "a.safetensors"
    shard.write_bytes(len(header).to_bytes(8, "little") + header + raw)
    entry = checkpoint_index(tmp_path)["w"]
    assert entry == SafetensorsEntry("w", shard, 8 + len(header), 8 + len(header) + len(raw), "BF16", (30, 100))
    locs = stream_tensors([("w32", entry, onnx.TensorProto.FLOAT), ("w16", entry, onnx.TensorProto.BFLOAT16)],
                          tmp_path / "x.data", consume=True)
    assert not shard.exists()  # consumed after its last tensor
    data = (tmp_path / "x.data").read_bytes()
    off, n = locs["w32"]
    np.testing.assert_array_equal(np.frombuffer(data[off:off + n], np.float32).reshape(30, 100),
                                  values.astype(ml_dtypes.bfloat16).astype(np.float32))
    off, n = locs["w16"]
    assert data[off:off + n] == raw


def test_stream_plan_names_what_does_not_fit() -> None:
    from uniref_deploy.export.lean import SafetensorsEntry, stream_plan
    from uniref_deploy.runtime.errors import ExportError

    fp16 = onnx.TensorProto.FLOAT16
    ckpt = {"a.weight": SafetensorsEntry("a.weight", Path("s.safetensors"), 0, 16, "BF16", (2, 4)),
            "b.weight": SafetensorsEntry("b.weight", Path("s.safetensors"), 16, 32, "BF16", (4, 2))}
    plan = stream_plan({"A": ((2, 4), fp16)}, {"A": "a.weight"}, ckpt, "Lean export")
    assert [(name, entry.key, dtype) for name, entry, dtype in plan] == [("A", "a.weight", fp16)]
    with pytest.raises(ExportError, match=r"Lean export cannot map 2 initializer\(s\).*'C'.*shape \(4, 2\)"):
        stream_plan({"A": ((2, 4), fp16), "C": ((1,), fp16), "B": ((2, 4), fp16)},
                    {"A": "a.weight", "C": None, "B": "b.weight"}, ckpt, "Lean export")
