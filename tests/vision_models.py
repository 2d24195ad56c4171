"""Tiny vision-language models (random weights, built from a config, offline) with their processors, for tests.

`build_tiny_qwen2_vl(folder)` and `build_tiny_llava(folder)` each save a folder that AutoProcessor and
AutoModelForImageTextToText load. transformers 5.25's Qwen2VLProcessor needs torchvision (for its video processor)
to be built, saved or loaded; where it is missing, tests/processing_qwen2_vl_image_only.py stands in, registered
with AutoProcessor in this process (its images go through Qwen2VLProcessor's own code).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import build_tokenizer

# Qwen2-VL's own chat template, trimmed: content is a string or a list of parts; an image part renders
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands <|image_pad|> to the image's token count).
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# LLaVA's own template (llava-hf's) reads list contents only: images first, then the text parts; a plain string
# content writes nothing, so tunelab must hand it every turn as parts (data/images.ImageCodec.needs_parts). In ChatML
# here, so that a trained tiny model learns where its turns end.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _tokenizer(folder: Path, specials: list[str]):
    tok = build_tokenizer(folder, chat_template=None)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.pad_token = tok.pad_token or tok.eos_token  # batches of several texts need a pad token
    return tok


def _text_sizes(tok, **more) -> dict:
    """Both models' language model: 2 layers, hidden 64, 4 heads (2 for keys and values), the tokenizer's ids."""
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **more,
    )


def build_tiny_qwen2_vl(folder) -> Path:
    """Qwen2-VL: 2 text layers (hidden 64), a 1-block vision tower (embed_dim 32, patch 14, merge 2).

    Image processor: min_pixels 56*56, max_pixels 112*112 -> 4 to 16 image tokens per image
    (a 56x56 image gives grid (1, 4, 4) -> 4 tokens; a 100x60 image gives (1, 8, 4) -> 8 tokens)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder, QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config=_text_sizes(
            tok,
            # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width); must sum to head_dim/2
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,  # the merger's output size: must equal the text hidden size
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = qwen2_vl_processor_class()(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE
    )
    processor.save_pretrained(folder)
    return folder


def _has_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def qwen2_vl_processor_class():
    """Qwen2VLProcessor where torchvision is installed; else Qwen2VLImageOnlyProcessor (same code for images, no
    video processor), registered with AutoProcessor so that AutoProcessor.from_pretrained(folder) finds it."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLProcessor

    if _has_torchvision():
        return Qwen2VLProcessor
    from tests.processing_qwen2_vl_image_only import Qwen2VLImageOnlyProcessor

    AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
    return Qwen2VLImageOnlyProcessor


def build_tiny_llava(folder) -> Path:
    """Llava: tiny CLIP vision tower (28 px, patch 14 -> 4 patches + CLS, 'default' strategy drops CLS -> 4 image
    tokens per image whatever its size), 2-layer Llama (hidden 64), a 2-layer MLP projector."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder, ["<image>"])
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    text = LlamaConfig(**_text_sizes(tok))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=4,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",  # must match the model's, or the token count is off by one
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_TEMPLATE,
        image_token="<image>",
    )
    processor.save_pretrained(folder)
    return folder


# Registered at import: a test that loads a folder built by another (a session-scoped fixture's) needs it too.
qwen2_vl_processor_class()
