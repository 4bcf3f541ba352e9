"""A tiny random LLaVA-OneVision (SigLIP + Qwen2) and an offline processor with the real chat template.

``build()`` gives a model that keeps the family's structure at toy size: a SigLIP tower read in full (no CLS:
``vision_feature_select_strategy="full"``), anyres tiling over a grid of pinpoints (1..6 x 1..6 tiles, as the
real 384-px tiles), the base tile first, one ``image_newline`` after each row of the crop grid, and the
``anyres_max_9`` downsampling of the crop grid (bilinear) once it holds more than ~9 tiles' worth of patches
(1.1 * 3 = 3.3 tiles a side: a 64x64 image already). ``real_settings()`` gives the config and processor of
llava-hf/llava-onevision-qwen2-7b-ov-hf's image path (no weights) for token-count checks at real size.
"""

from __future__ import annotations

from pathlib import Path

import torch

CKPT = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
TILE, PATCH = 16, 4  # tiny: 4x4 patches a tile (real: 384 px, patch 14 -> 27x27 = 729, 6 px of each tile unseen)
PINPOINTS = [[TILE * r, TILE * c] for r in range(1, 7) for c in range(1, 7)]
# Qwen2's special tokens (ids 151643..151647 in the real vocab) and LLaVA-OneVision's two placeholders.
ENDOFTEXT, IM_START, IM_END, IMAGE, VIDEO = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"
SPECIALS = [ENDOFTEXT, IM_START, IM_END, IMAGE, VIDEO]
TEMPLATE_PATH = Path(__file__).resolve().parent / "data" / "chat_templates" / "llava_onevision.jinja"

# llava-hf/llava-onevision-qwen2-7b-ov-hf: config.json (SigLIP so400m at 384/14, 26 layers, no head; Qwen2-7B),
# preprocessor_config.json (size 384x384, mean/std 0.5, bicubic, do_pad), processor_config.json (num_image_tokens
# 729, strategy "full"); the pinpoints are the config's default 6x6 list of 384-multiples.
REAL_TILE, REAL_PATCH, REAL_N_IMAGE_TOKENS = 384, 14, 729
REAL_PINPOINTS = [[REAL_TILE * r, REAL_TILE * c] for r in range(1, 7) for c in range(1, 7)]
REAL_IMAGE_TOKEN_ID, REAL_VIDEO_TOKEN_ID, REAL_VOCAB = 151646, 151647, 152128


def chat_template() -> str:
    """The real chat template of CKPT (its chat_template.json), verbatim."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def _words() -> list[str]:
    from lineofsight import prompts

    texts = [value for name, value in vars(prompts).items() if name.isupper() and isinstance(value, str)]
    texts += list(prompts.ROLLOUT_QUESTIONS)
    texts += ["user", "assistant", "system", "You are a helpful assistant.", "\n", "circle square star ring triangle "
              "red green blue yellow small large shape image a an the is of yes no A B C D"]
    return texts


def tokenizer():
    """A byte-level BPE (a few hundred tokens, trained in milliseconds) with Qwen2's special tokens as single
    tokens: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), ``<image>``, ``<video>``; no BOS (Qwen2's
    tokenizer has none and adds none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_words(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, padding_side="left")
    wrapped.add_special_tokens({"additional_special_tokens": [IM_START, IMAGE, VIDEO]})
    return wrapped


def _processor(image_processor, tok, n_image_tokens: int):
    """The processor. Its video processor needs torchvision (transformers 5.24 builds no LlavaOnevisionProcessor
    without one, nor loads CKPT's with AutoProcessor): without torchvision the class load_vlm then loads
    (``lineofsight.models.image_only_processor_class``), the same for images and text."""
    import importlib.util

    from transformers import LlavaOnevisionProcessor

    settings = dict(image_processor=image_processor, tokenizer=tok, num_image_tokens=n_image_tokens,
                    vision_feature_select_strategy="full", chat_template=chat_template(),
                    vision_aspect_ratio="anyres_max_9")
    if importlib.util.find_spec("torchvision") is None:
        from lineofsight.models import image_only_processor_class

        return image_only_processor_class("llava_onevision")(**settings)
    from transformers import LlavaOnevisionVideoProcessor

    tile = image_processor.size["height"]
    video_processor = LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile}, image_mean=[0.5] * 3,
                                                   image_std=[0.5] * 3)
    return LlavaOnevisionProcessor(video_processor=video_processor, **settings)


def build(n_layers: int = 3, seed: int = 0):
    """(model.eval(), processor): a tiny random LlavaOnevisionForConditionalGeneration and its processor."""
    import transformers

    tok = tokenizer()
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIALS}
    vocab = len(tok) + (-len(tok)) % 64  # padded like the real 152128 > len(tokenizer)
    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=TILE, patch_size=PATCH,
                                             vision_use_head=False)
    text = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                    max_position_embeddings=2048, bos_token_id=ids[ENDOFTEXT],
                                    eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], tie_word_embeddings=False)
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=ids[IMAGE], video_token_index=ids[VIDEO],
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids[ENDOFTEXT]
    model.generation_config.eos_token_id = ids[IM_END]
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS, image_mean=[0.5] * 3,
        image_std=[0.5] * 3)
    return model.eval(), _processor(image_processor, tok, (TILE // PATCH) ** 2)


def real_settings():
    """(config, processor) with CKPT's real image settings and no weights (the tiny tokenizer stands in for
    Qwen2's: only the image placeholder matters for token counts)."""
    import transformers

    tok = tokenizer()
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                                      num_attention_heads=16, image_size=REAL_TILE,
                                                      patch_size=REAL_PATCH, vision_use_head=False),
        text_config=transformers.Qwen2Config(vocab_size=REAL_VOCAB, hidden_size=3584, intermediate_size=18944,
                                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4), image_token_index=tok.convert_tokens_to_ids(IMAGE),
        video_token_index=tok.convert_tokens_to_ids(VIDEO), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=REAL_PINPOINTS, vision_aspect_ratio="anyres_max_9",
    )
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": REAL_TILE, "width": REAL_TILE}, image_grid_pinpoints=REAL_PINPOINTS, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, resample=3)
    return cfg, _processor(image_processor, tok, REAL_N_IMAGE_TOKENS)
