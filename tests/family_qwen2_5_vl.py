"""A tiny random Qwen2.5-VL (transformers' ``Qwen2_5_VLForConditionalGeneration``) with an offline processor.

Everything is built from config: no download. The processor is the real ``Qwen2_5_VLProcessor`` with the real
chat template of Qwen/Qwen2.5-VL-7B-Instruct (``tests/data/chat_templates/qwen2_5_vl.jinja``), a byte-level BPE
trained in a few milliseconds on the project's prompts (the Qwen2 pre-tokenizer, its 14 special tokens as single
tokens in the real order), and a PIL image processor with the real structure at a small scale: patch 4, 2x2 merge
(one LLM token per 8x8 pixels), ``smart_resize`` between 4 and 96 merged cells, and vision windows of 4x4 merged
cells, so a 64x96 image (12 rows x 8 cols of cells) spans 3x2 windows and the vision tower reorders its patches.
Without torchvision the processor is an image-only subclass (transformers' Qwen2_5_VLProcessor needs a video
processor, and those need torchvision): :func:`processor`.
:func:`real_settings`: the 7B's image settings (config.json, preprocessor_config.json) without weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

CKPT = "Qwen/Qwen2.5-VL-7B-Instruct"
TEMPLATE_PATH = Path(__file__).resolve().parent / "data" / "chat_templates" / "qwen2_5_vl.jinja"

# The special tokens of Qwen2.5-VL's tokenizer, in the order of their ids (151643..151656 in the real one).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
PATCH, MERGE, WINDOW = 4, 2, 32  # WINDOW // MERGE // PATCH = 4 merged cells a side per attention window
MIN_PIXELS, MAX_PIXELS = (2 * PATCH * MERGE) ** 2, 96 * (PATCH * MERGE) ** 2  # 4 .. 96 merged cells
BPE_VOCAB = 400

# Qwen/Qwen2.5-VL-7B-Instruct: config.json (vision_config, text sizes, token ids) and preprocessor_config.json.
REAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
REAL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                 sliding_window=32768, use_sliding_window=False, max_window_layers=28, bos_token_id=151643,
                 eos_token_id=151645)
REAL_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                      vision_end_token_id=151653)
REAL_IMAGE = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                  image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                  resample=3)


def chat_template() -> str:
    """The chat template of Qwen/Qwen2.5-VL-7B-Instruct, verbatim."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def _corpus() -> list[str]:
    from lineofsight import prompts, toy

    texts = [v for v in vars(prompts).values() if isinstance(v, str)] + list(prompts.ROLLOUT_QUESTIONS)
    words = list(toy.CLASSES) + list(toy.COLOURS) + ["small", "medium", "large", "yes", "no", "shape", "image"]
    texts += [" ".join(words), "system\nYou are a helpful assistant.", "user\n", "assistant\n", "Picture 1: "]
    texts += [f"A {c} {s}." for c in toy.COLOURS for s in toy.CLASSES]
    return texts


def tokenizer():
    """A Qwen2Tokenizer (the real class) over a byte-level BPE trained on the project's prompts, with the
    Qwen2.5-VL special tokens after the BPE vocabulary in the real order; eos ``<|im_end|>``, pad
    ``<|endoftext|>``, no bos and no unk (as the real tokenizer_config.json)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    vocab = bpe.get_vocab()
    merges = _merges(bpe)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens=list(SPECIAL_TOKENS[1:]),
                         model_max_length=32768, clean_up_tokenization_spaces=False)
    return tok


def _merges(bpe) -> list[tuple[str, str]]:
    import json

    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(bpe.to_str())["model"]["merges"]]


def image_processor(**overrides):
    from transformers import Qwen2VLImageProcessorPil

    settings = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, temporal_patch_size=2,
                    merge_size=MERGE, image_mean=REAL_IMAGE["image_mean"], image_std=REAL_IMAGE["image_std"])
    settings.update(overrides)
    return Qwen2VLImageProcessorPil(**settings)


def processor(tok=None, image_settings: dict | None = None):
    """The real ``Qwen2_5_VLProcessor`` over :func:`tokenizer` and :func:`image_processor`.

    transformers 5.24 cannot build a Qwen2_5_VLProcessor without a video processor, and every video processor needs
    torchvision (so does ``AutoProcessor.from_pretrained`` of the real checkpoint). With torchvision installed this
    is the real class with a ``Qwen2VLVideoProcessor``; without it ``lineofsight.models.image_only_processor_class``'s
    (what ``load_vlm`` loads there)."""
    from transformers import Qwen2_5_VLProcessor

    parts = dict(image_processor=image_processor(**(image_settings or {})),
                 tokenizer=tok if tok is not None else tokenizer(), chat_template=chat_template())
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    except ImportError:  # no torchvision
        from lineofsight.models import image_only_processor_class

        return image_only_processor_class("qwen2_5_vl")(**parts)
    settings = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    settings.update({k: v for k, v in (image_settings or {}).items() if k in settings})
    return Qwen2_5_VLProcessor(video_processor=Qwen2VLVideoProcessor(**settings), **parts)


def config(tok, n_layers: int = 3):
    from transformers import Qwen2_5_VLConfig

    ids = {name: tok.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                # head_dim 16: the rotary half (8 frequencies) split into t/h/w sections, as [16, 24, 24] of 64.
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, window_size=WINDOW, fullatt_block_indexes=[1],
                  tokens_per_second=2, hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def build(n_layers: int = 3, seed: int = 0):
    """(model.eval(), processor): a tiny random Qwen2.5-VL and its offline processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    proc = processor()
    model = Qwen2_5_VLForConditionalGeneration(config(proc.tokenizer, n_layers))
    return model.eval(), proc


def real_settings():
    """(config, processor) with Qwen/Qwen2.5-VL-7B-Instruct's real sizes and image settings, no weights (the
    tokenizer is the tiny one; only its image-token handling matters for token counts)."""
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(text_config=REAL_TEXT, vision_config=REAL_VISION, **REAL_TOKEN_IDS)
    settings = {k: v for k, v in REAL_IMAGE.items() if k not in ("resample",)}
    return cfg, processor(image_settings=settings)
