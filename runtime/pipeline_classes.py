"""The diffusers pipeline classes the runtime serves, and what each means for text conditioning.

One home for the prompt templates and their dropped-token counts: ``runtime/text.py`` encodes with them and
``uniref_deploy.presets`` builds tokenizers that honour them. A model folder's class comes from
``model_index.json``'s ``_class_name`` (``ModelConfig.pipeline_class``):

- ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509/2511): any number of references, one "Picture i:" vision block each,
  condition images resized to a fixed area (384², aspect kept).
- ``QwenImageEditPipeline`` (Qwen-Image-Edit): exactly one reference, one unlabelled vision block, the condition
  image at the reference's VAE size; its conditioning then holds the image's vision tokens too (~1370 at 1024²),
  so its text-axis limit is larger.

Both drop the template's system part (64 tokens with Qwen2's tokenizer) from the conditioning. Qwen-Image
text-to-image and Layered folders are refused (``REFUSED``).
"""

from __future__ import annotations

from dataclasses import dataclass

EDIT_PLUS = "QwenImageEditPlusPipeline"
EDIT = "QwenImageEditPipeline"

# The system part shared by both edit templates; its tokens are dropped from the conditioning.
SYSTEM_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
SYSTEM_PREFIX_TOKENS = 64  # Qwen2's tokenizer splits SYSTEM_PREFIX into this many tokens
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
CONDITION_IMAGE_AREA = 384 * 384  # Edit-Plus: every condition image's area (diffusers' CONDITION_IMAGE_SIZE)
MAX_TEXT_TOKENS = 1024  # the DiT's text-axis maximum for Edit-Plus (engine profiles go up to here)
# Edit: 1024 prompt tokens plus the vision tokens of a condition image as large as the largest bucket (2048²:
# one token per 28x28 pixels, ~5350), rounded up to a power of two.
EDIT_MAX_TEXT_TOKENS = 8192


@dataclass(frozen=True)
class PipelineClass:
    """What one diffusers edit pipeline class means for the runtime.

    Args:
        name: the diffusers class name (``model_index.json``'s ``_class_name``).
        template: the full prompt template; ``{}`` takes the picture blocks (if any) and the prompt.
        picture: one labelled vision block per reference (``{}`` = 1-based index), or None when ``template``
            holds the single unlabelled block itself.
        drop_tokens: leading tokens of the encoded template removed from the conditioning.
        min_references: fewest references one edit takes.
        max_references: most references one edit takes (None: no limit).
        condition_area: pixel area of the condition images; None means each reference at its VAE size.
        max_text_tokens: the longest conditioning (text axis) this class produces.
    """

    name: str
    template: str
    picture: str | None
    drop_tokens: int
    min_references: int
    max_references: int | None
    condition_area: int | None
    max_text_tokens: int

    def format_prompt(self, prompt: str, num_images: int) -> str:
        """The full templated text for ``prompt`` with ``num_images`` references."""
        if self.picture is None:
            return self.template.format(prompt)
        pictures = "".join(self.picture.format(i + 1) for i in range(num_images))
        return self.template.format(pictures + prompt)


_SUFFIX = "{}<|im_end|>\n<|im_start|>assistant\n"

PIPELINE_CLASSES: dict[str, PipelineClass] = {
    EDIT_PLUS: PipelineClass(
        name=EDIT_PLUS,
        template=SYSTEM_PREFIX + _SUFFIX,
        picture="Picture {}: " + VISION_BLOCK,
        drop_tokens=SYSTEM_PREFIX_TOKENS,
        min_references=0,
        max_references=None,
        condition_area=CONDITION_IMAGE_AREA,
        max_text_tokens=MAX_TEXT_TOKENS,
    ),
    EDIT: PipelineClass(
        name=EDIT,
        template=SYSTEM_PREFIX + VISION_BLOCK + _SUFFIX,
        picture=None,
        drop_tokens=SYSTEM_PREFIX_TOKENS,
        min_references=1,
        max_references=1,
        condition_area=None,
        max_text_tokens=EDIT_MAX_TEXT_TOKENS,
    ),
}

# Qwen-Image pipelines whose checkpoints are not edit models: refused at load, with what they are.
REFUSED: dict[str, str] = {
    "QwenImagePipeline": "a Qwen-Image text-to-image model",
    "QwenImageImg2ImgPipeline": "a Qwen-Image text-to-image model",
    "QwenImageInpaintPipeline": "a Qwen-Image text-to-image model",
    "QwenImageControlNetPipeline": "a Qwen-Image text-to-image model",
    "QwenImageControlNetInpaintPipeline": "a Qwen-Image text-to-image model",
    "QwenImageLayeredPipeline": "a Qwen-Image-Layered decomposition model",
}
# The components an edit folder of another class name must have to load as Edit-Plus.
EDIT_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "processor")


def pipeline_class(name: str) -> PipelineClass:
    """The ``PipelineClass`` for ``name``; unknown names fall back to Edit-Plus (the caller warns)."""
    return PIPELINE_CLASSES.get(name, PIPELINE_CLASSES[EDIT_PLUS])
