"""Load-time checks of model folders (``ModelConfig.from_diffusers_dir``): pipeline class and transformer flags.

Folders are written from the published configs kept in ``presets/real_configs`` (JSON only: the checks read no
weights), then changed one field at a time. The CLI tests run ``uniref-deploy`` in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from uniref_deploy.presets.real import REAL_MODELS, real_config
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.manifest import ModelConfig
from uniref_deploy.runtime.pipeline_classes import EDIT, EDIT_COMPONENTS, EDIT_PLUS

T2I_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")  # Qwen-Image: no processor


def write_folder(root: Path, name: str = "qwen-image-edit-2511", class_name: str | None = None,
                 components: tuple[str, ...] = EDIT_COMPONENTS, **transformer_changes) -> Path:
    """A diffusers folder holding only the JSON configs of real model ``name``, with the changes applied."""
    cfg = real_config(name)
    class_name = class_name or cfg["model_index_class"]
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": class_name, **{c: ["diffusers", "X"] for c in components}}
    (root / "model_index.json").write_text(json.dumps(index))
    for sub, file, data in (("transformer", "config.json", {**cfg["transformer"], **transformer_changes}),
                            ("vae", "config.json", cfg["vae"]),
                            ("scheduler", "scheduler_config.json", cfg["scheduler"])):
        (root / sub).mkdir(exist_ok=True)
        (root / sub / file).write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_configs_load_as_their_class(tmp_path, name):
    config = ModelConfig.from_diffusers_dir(write_folder(tmp_path, name))
    assert config.pipeline_class == real_config(name)["model_index_class"]
    assert config.zero_cond_t == (name == "qwen-image-edit-2511")
    assert config.text_encoder_dtype == "auto"


BAD_FLAGS = [
    ({"guidance_embeds": True}, "guidance_embeds"),
    ({"use_additional_t_cond": True}, "use_additional_t_cond"),
    ({"use_layer3d_rope": True}, "use_layer3d_rope"),
    ({"patch_size": 1}, "patch_size 1"),
    ({"in_channels": 16}, "in_channels 16"),
    ({"out_channels": 64}, "out_channels 64"),
]


@pytest.mark.parametrize(("change", "needle"), BAD_FLAGS, ids=[n for _, n in BAD_FLAGS])
def test_unsupported_transformer_configs_are_refused(tmp_path, change, needle):
    with pytest.raises(InputError, match=needle) as info:
        ModelConfig.from_diffusers_dir(write_folder(tmp_path, **change))
    assert "\n" not in str(info.value)


def test_out_channels_none_means_in_channels(tmp_path):
    with pytest.raises(InputError, match="out_channels 64"):
        ModelConfig.from_diffusers_dir(write_folder(tmp_path, out_channels=None))


@pytest.mark.parametrize(("class_name", "components", "needle"), [
    ("QwenImagePipeline", T2I_COMPONENTS, "text-to-image"),
    ("QwenImageLayeredPipeline", EDIT_COMPONENTS, "Layered"),
    ("MyImagePipeline", T2I_COMPONENTS, "without the edit components"),
])
def test_other_pipeline_classes_are_refused(tmp_path, class_name, components, needle):
    with pytest.raises(InputError, match=needle) as info:
        ModelConfig.from_diffusers_dir(write_folder(tmp_path, class_name=class_name, components=components))
    assert "\n" not in str(info.value)


def test_unknown_edit_class_loads_as_edit_plus_with_a_warning(tmp_path, caplog):
    folder = write_folder(tmp_path, class_name="UniRefImageEditPipeline")
    with caplog.at_level("WARNING"):
        config = ModelConfig.from_diffusers_dir(folder)
    assert config.pipeline_class == EDIT_PLUS
    assert "UniRefImageEditPipeline" in caplog.text and "--pipeline-class" in caplog.text


def test_pipeline_class_option_states_the_family(tmp_path):
    folder = write_folder(tmp_path, class_name="UniRefImageEditPipeline")
    assert ModelConfig.from_diffusers_dir(folder, pipeline_class=EDIT).pipeline_class == EDIT
    with pytest.raises(InputError, match="Unknown pipeline class"):
        ModelConfig.from_diffusers_dir(folder, pipeline_class="QwenImagePipeline")


def test_text_encoder_dtype_is_recorded_and_checked(tmp_path):
    folder = write_folder(tmp_path)
    config = ModelConfig.from_diffusers_dir(folder, text_encoder_dtype="float32")
    assert ModelConfig.from_dict(json.loads(json.dumps(config.__dict__))).text_encoder_dtype == "float32"
    with pytest.raises(InputError, match="text-encoder dtype"):
        ModelConfig.from_diffusers_dir(folder, text_encoder_dtype="float16")


def test_old_manifests_default_to_edit_plus_auto():
    config = ModelConfig.from_dict({"family": "qwen-image", "transformer": {}, "vae": {}, "scheduler": {}})
    assert (config.pipeline_class, config.text_encoder_dtype) == (EDIT_PLUS, "auto")


# --- the CLI: refused at load, one line, exit 2 ---------------------------------------------------------------

CLI_REFUSALS = [
    ({"components": EDIT_COMPONENTS, "guidance_embeds": True}, "guidance_embeds"),
    ({"class_name": "QwenImagePipeline", "components": T2I_COMPONENTS}, "text-to-image"),
    ({"class_name": "QwenImageLayeredPipeline", "use_layer3d_rope": True, "use_additional_t_cond": True}, "Layered"),
]


@pytest.mark.parametrize("verb", ["edit", "export"])
@pytest.mark.parametrize(("folder_args", "needle"), CLI_REFUSALS, ids=["guidance", "text-to-image", "layered"])
def test_cli_refuses_at_load(tmp_path, verb, folder_args, needle):
    folder = write_folder(tmp_path / "model", **folder_args)
    args = (["edit", str(folder), "--prompt", "x", "-o", str(tmp_path / "out.png")] if verb == "edit"
            else ["export", str(folder), "--out", str(tmp_path / "art")])
    code = "import sys; from uniref_deploy.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "art" / "manifest.json").exists()
