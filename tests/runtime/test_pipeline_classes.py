"""The prompt facts of each served pipeline class equal diffusers' own (template, dropped tokens, picture block)."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

from uniref_deploy.runtime.pipeline_classes import EDIT, EDIT_PLUS, PIPELINE_CLASSES, REFUSED  # noqa: E402


def _bare(name: str):
    """diffusers' pipeline ``name`` without components: its __init__ still sets the prompt template."""
    return getattr(diffusers, name)(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                    transformer=None)


@pytest.mark.parametrize("name", [EDIT, EDIT_PLUS])
def test_template_and_drop_count_match_diffusers(name):
    ours, theirs = PIPELINE_CLASSES[name], _bare(name)
    assert ours.template == theirs.prompt_template_encode
    assert ours.drop_tokens == theirs.prompt_template_encode_start_idx


def test_edit_plus_picture_blocks_match_diffusers():
    import inspect

    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    source = inspect.getsource(plus.QwenImageEditPlusPipeline._get_qwen_prompt_embeds)
    assert f"\"{PIPELINE_CLASSES[EDIT_PLUS].picture}\"" in source  # diffusers keeps it as a local literal
    text = PIPELINE_CLASSES[EDIT_PLUS].format_prompt("go", 2)
    assert text.count("<|image_pad|>") == 2 and "Picture 2: " in text and text.endswith("assistant\n")
    single = PIPELINE_CLASSES[EDIT].format_prompt("go", 1)
    assert single.count("<|image_pad|>") == 1 and "Picture" not in single


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_classes_exist_in_diffusers(name):
    assert hasattr(diffusers, name), f"{name} is not a diffusers pipeline; the refusal list is stale"
