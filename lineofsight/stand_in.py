"""Random-weight stand-ins for the paper's model, built from config (nothing is downloaded).

Scale bugs show at the real width, never on the toy: :func:`real_width_llava_next` builds
LLaVA-NeXT-Mistral as ``llava-hf/llava-v1.6-mistral-7b-hf`` is laid out (d_model 4096, MLP 14336,
vocabulary 32064, the 24-layer CLIP-L/14 tower at 336 px, anyres pinpoints) with only the first
``n_layers`` decoder blocks, and its processor with the real Mistral v1 tokenizer that
``mistral-common`` ships. ``scripts/benchmark.py --only realwidth`` and the tests use it.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import tempfile
from typing import Any

__all__ = ["PINPOINTS_336", "mistral_v1_tokenizer", "real_width_llava_next"]

PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
"""llava-v1.6-mistral's anyres grids."""
IMAGE_TOKEN_ID = 32000

_TOKENIZER: Any = None


def mistral_v1_tokenizer() -> Any:
    """The real LLaVA-NeXT-Mistral tokenizer: Mistral v1 sentencepiece + ``<image>`` (id 32000)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import LlamaTokenizer

        src = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(str(src), os.path.join(tmp, "tokenizer.model"))
            tok = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True, add_eos_token=False)
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.pad_token = tok.unk_token
        _TOKENIZER = tok
    return _TOKENIZER


def real_width_llava_next(n_layers: int = 2, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0
                          ) -> tuple[Any, Any]:
    """(model, processor): LLaVA-NeXT-Mistral at full width with ``n_layers`` decoder blocks, random
    weights (seeded), in ``dtype`` on ``device``, eval mode."""
    import torch
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14,
                                           projection_dim=768)
    text = transformers.MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=n_layers, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=128, max_position_embeddings=32768, rope_theta=1e6,
                                      sliding_window=None, rms_norm_eps=1e-5)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                                          image_grid_pinpoints=PINPOINTS_336)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlavaNextForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS_336)
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=mistral_v1_tokenizer(), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor
