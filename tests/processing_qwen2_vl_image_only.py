"""Qwen2VLProcessor without its video processor, for machines without torchvision (tests/vision_models.py).

transformers 5.25's Qwen2VLProcessor needs a Qwen2VLVideoProcessor, which needs torchvision: without it the
processor can be neither built (ProcessorMixin's type check of `video_processor` reads a dummy mapping and
raises AttributeError: VIDEO_PROCESSOR_MAPPING has no _extra_content), nor saved (None has no _auto_class), nor
loaded (AutoVideoProcessor). Images go through exactly Qwen2VLProcessor's code; only videos are unsupported.
"""

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Qwen2VLProcessor.__init__'s token set-up, then ProcessorMixin with two sub-processors
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
