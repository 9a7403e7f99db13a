"""The serving request checks and the generated Triton repository, without a server.

config.pbtxt is parsed with Triton's own ``ModelConfig`` protobuf schema (shipped in tritonclient).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import InputError, ManifestError
from uniref_deploy.runtime.packing import as_budget
from uniref_deploy.tools.serving.interface import (
    INPUTS,
    MODEL_NAME,
    OUTPUTS,
    RequestLimits,
    budget_value,
    decode_image,
    parse_request,
    request_bytes,
)
from uniref_deploy.tools.serving.repository import RepositoryOptions, config_pbtxt, write_repository


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def request(prompt: bytes | None = b"make it blue", images: list[bytes] | None = None, **scalars) -> dict:
    tensors = {} if prompt is None else {"prompt": np.array([[prompt]], dtype=object)}
    if images is not None:
        tensors["images"] = np.array([images], dtype=object).reshape(1, len(images))
    for name, value in scalars.items():
        tensors[name] = np.asarray([[value]])
    return tensors


LIMITS = RequestLimits(max_references=3, max_request_bytes=2**20)


def test_parse_maps_inputs_to_pipeline_arguments():
    kwargs = parse_request(request(images=[png(40, 30), png(20, 20, 1)], steps=np.int32(3),
                                   true_cfg_scale=np.float32(2.5), seed=np.int64(7), budget=np.int32(1024),
                                   width=np.int32(64), height=np.int32(48),
                                   policy=np.bytes_(b"per-image")), LIMITS)
    assert [im.size for im in kwargs.pop("image")] == [(40, 30), (20, 20)]
    assert kwargs == {"prompt": "make it blue", "num_inference_steps": 3, "true_cfg_scale": 2.5, "seed": 7,
                      "budget": Budget.from_side(1024), "width": 64, "height": 48, "policy": "per-image"}


@pytest.mark.parametrize("sent", [1024, 512, 1280, 8192, 300_000, 1536 * 1536])
def test_budget_is_read_as_the_cli_reads_it(sent):
    """INT32 ``budget`` means what ``--budget N`` means (a side up to 8192, else pixels), as the pipeline sees it."""
    kwargs = parse_request(request(budget=np.int32(sent)), LIMITS)
    assert as_budget(kwargs["budget"]) == Budget.parse(str(sent))
    assert as_budget(kwargs["budget"]).pixels == (sent * sent if sent <= 8192 else sent)


@pytest.mark.parametrize("sent", [0, -1024])
def test_non_positive_budget_is_an_input_error(sent):
    with pytest.raises(InputError, match="must be positive"):
        parse_request(request(budget=np.int32(sent)), LIMITS)


@pytest.mark.parametrize("budget", [Budget.from_side(512), Budget.from_side(1024), Budget.from_pixels(300_000),
                                    1536, 2_000_000])
def test_client_budget_value_reads_back_the_same(budget):
    kwargs = parse_request(request(budget=np.int32(budget_value(budget))), LIMITS)
    assert kwargs["budget"] == Budget.parse(budget)


def test_client_refuses_a_budget_the_wire_cannot_carry():
    with pytest.raises(InputError, match="cannot be sent"):
        budget_value(Budget.from_pixels(5000))


def test_decoded_reference_equals_the_file():
    data = png(33, 17, seed=3)
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_size_limit_is_checked_before_decoding():
    """A corrupt image over the limit gets the size message: decoding never ran."""
    too_big = b"\0" * (LIMITS.max_request_bytes + 1)
    with pytest.raises(InputError, match="over this server's limit of 1 MB"):
        parse_request(request(images=[too_big]), LIMITS)
    with pytest.raises(InputError, match="not in a format Pillow can read"):
        parse_request(request(images=[too_big[:1000]]), LIMITS)


def test_too_many_references_are_refused_before_decoding():
    with pytest.raises(InputError, match="4 reference images, over this server's limit of 3"):
        parse_request(request(images=[b"not an image"] * 4), LIMITS)


@pytest.mark.parametrize("blob, message", [
    (b"", "empty"),
    (b"GIF89a-not-really", "not in a format Pillow can read"),
    (png(64, 64)[:200], "cannot be decoded"),
])
def test_bad_images_are_one_line_input_errors(blob, message):
    with pytest.raises(InputError, match=message) as info:
        parse_request(request(images=[png(8, 8), blob]), LIMITS)
    assert "\n" not in str(info.value)
    assert "Request image 1" in str(info.value)


def test_pixel_limit_is_read_from_the_header():
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header_only = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 8000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    with pytest.raises(InputError, match="9000x8000, over the 64 MP limit"):
        decode_image(header_only)


@pytest.mark.parametrize("tensors, message", [
    (request(prompt=None), "no 'prompt' input"),
    (request(prompt=b"\xff\xfe"), "not valid UTF-8"),
    ({**request(), "prompt": np.array([[b"a", b"b"]], dtype=object)}, "has shape \\[1, 2\\]"),
    ({**request(), "colour": np.array([[1]])}, "Unknown input"),
    ({**request(), "images": np.array([b"a", b"b"], dtype=object)}, "Input 'images' has shape"),
])
def test_malformed_requests(tensors, message):
    with pytest.raises(InputError, match=message):
        parse_request(tensors, LIMITS)


def test_request_bytes_counts_blob_lengths():
    assert request_bytes({"images": np.array([[b"abc", b"de"]], dtype=object), "n": np.zeros((1, 1), np.int32)}) == 9


# --- the model repository --------------------------------------------------------------------------------------

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse_config(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("options", [
    RepositoryOptions(instances=2, kind="gpu", gpus=(0, 1), backend="trt", precision="fp16"),
    RepositoryOptions(instances=3, kind="cpu", limits=RequestLimits(5, 3 * 2**20)),
])
def test_config_pbtxt_parses_with_tritons_schema(tmp_path, options):
    cfg = parse_config(config_pbtxt(tmp_path / 'art "quoted"', options))
    assert cfg.name == MODEL_NAME and cfg.backend == "python" and cfg.max_batch_size == 1
    types = {v: k for k, v in model_config_pb2.DataType.items()}
    assert [(t.name, types[t.data_type], list(t.dims), t.optional) for t in cfg.input] == [
        (s.name, f"TYPE_{s.dtype}", list(s.dims), s.optional) for s in INPUTS]
    assert [(t.name, types[t.data_type], list(t.dims)) for t in cfg.output] == [
        (s.name, f"TYPE_{s.dtype}", list(s.dims)) for s in OUTPUTS]
    (group,) = cfg.instance_group
    assert group.count == options.instances
    assert group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value(f"KIND_{options.kind.upper()}")
    assert list(group.gpus) == list(options.gpus or ())
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["artifacts"] == str((tmp_path / 'art "quoted"').resolve())
    assert params["backend"] == options.backend
    assert int(params["max_references"]) == options.limits.max_references
    assert float(params["max_request_mb"]) * 2**20 == options.limits.max_request_bytes


def test_write_repository_refuses_a_non_artifact_folder(tmp_path):
    with pytest.raises(ManifestError):
        write_repository(tmp_path, tmp_path / "repo", RepositoryOptions())
    assert not (tmp_path / "repo" / MODEL_NAME).exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "torch"}, "Unknown backend"),
    ({"kind": "tpu"}, "Unknown instance kind"),
    ({"instances": 0}, "at least 1"),
    ({"gpus": (0,)}, "GPU ids were given for CPU instances"),
])
def test_repository_options_are_checked(kwargs, message):
    with pytest.raises(InputError, match=message):
        RepositoryOptions(**kwargs)


def test_timings_json_sums_dit_steps():
    from uniref_deploy.runtime.pipeline import StageTimes
    from uniref_deploy.tools.serving.interface import timings_json

    t = json.loads(timings_json(StageTimes(text_encode=0.5, dit=[0.25, 0.5], total=2.0)))
    assert t["dit"] == 0.75 and t["dit_steps"] == 2 and t["total"] == 2.0
