"""A tiny random Gemma 3 (transformers' ``Gemma3ForConditionalGeneration``) with an offline processor.

Everything is built from config: no download. The processor is the real ``Gemma3Processor`` with the real chat
template of google/gemma-3-4b-it (``tests/data/chat_templates/gemma3.jinja``), transformers' own ``GemmaTokenizer``
(BPE over text whose spaces are ``▁``, byte fallback) on a vocabulary trained in a few milliseconds on the project's
prompts, holding Gemma's special tokens as single tokens in Gemma's order (pad 0, eos 1, bos 2, unk 3, mask 4, then
the turn and image markers; ``<image_soft_token>`` is the placeholder the model fills), and the PIL image processor
with the real structure at a small scale: every image squashed to one 64x64 tile (no aspect ratio kept, no pan and
scan), patch 4 (16x16 patches), average-pooled 2x2 by the projector to a fixed 8x8 = 64 soft tokens per image
(the 4B: 896 px, patch 14, 64x64 patches pooled 4x4 to 16x16 = 256). The text model alternates sliding-window and
full-attention layers (window 16, shorter than one image) as the 4B does (5 sliding : 1 full there).
:func:`real_settings`: the 4B's image settings (config.json, preprocessor_config.json) without weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

CKPT = "google/gemma-3-4b-it"
TEMPLATE_PATH = Path(__file__).resolve().parent / "data" / "chat_templates" / "gemma3.jinja"

# Gemma's special tokens in the order of their ids where it has one (pad 0, eos 1, bos 2, unk 3, mask 4; the real
# vocabulary has <start_of_turn> 105, <end_of_turn> 106, <start_of_image> 255999, <end_of_image> 256000,
# <image_soft_token> 262144).
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>")
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
TILE, PATCH, MM_TOKENS = 64, 4, 64  # 16x16 patches, avg-pooled 2x2 -> 8x8 soft tokens
SLIDING_WINDOW = 16
BPE_VOCAB = 480

# google/gemma-3-4b-it: config.json (vision_config, mm_tokens_per_image, token ids, text sizes) and
# preprocessor_config.json (size 896x896, mean/std 0.5, resample 2 = bilinear, do_pan_and_scan null).
REAL_VISION = dict(hidden_size=1152, image_size=896, intermediate_size=4304, num_attention_heads=16,
                   num_hidden_layers=27, patch_size=14, vision_use_head=False)
REAL_TEXT = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                 vocab_size=262208, rope_scaling={"rope_type": "linear", "factor": 8.0})
REAL_TOKEN_IDS = dict(boi_token_index=255999, eoi_token_index=256000, image_token_index=262144)
REAL_MM_TOKENS = 256
REAL_IMAGE = dict(size={"height": 896, "width": 896}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                  resample=2, rescale_factor=1 / 255, do_resize=True, do_rescale=True, do_normalize=True)


def chat_template() -> str:
    """The chat template of google/gemma-3-4b-it, verbatim."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def _corpus() -> list[str]:
    from lineofsight import prompts, toy

    texts = [v for v in vars(prompts).values() if isinstance(v, str)] + list(prompts.ROLLOUT_QUESTIONS)
    words = list(toy.CLASSES) + list(toy.COLOURS) + ["small", "medium", "large", "yes", "no", "shape", "image"]
    # The chat template's and the processor's pieces: "user\n" + "\n\n" before <start_of_image>, "\n\n" after
    # <end_of_image> (Gemma's vocabulary has "\n\n" and "\n\n\n" as single tokens).
    texts += [" ".join(words), "You are a helpful assistant.\n\n"] + ["user\n\n\n", "\n\n", "model\n"] * 20
    texts += [f"A {c} {s}." for c in toy.COLOURS for s in toy.CLASSES]
    return texts


_TOKENIZER_PARTS: tuple[dict[str, int], list[tuple[str, str]]] | None = None


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary with Gemma's layout: the special tokens first, the 256 byte-fallback tokens ``<0x00>``..,
    then pieces learnt on the corpus (spaces as ``▁``; merges never cross a word or a newline run)."""
    global _TOKENIZER_PARTS
    if _TOKENIZER_PARTS is None:
        import json

        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

        trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        trainer_tok.normalizer = normalizers.Replace(" ", "▁")
        trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
            pre_tokenizers.Split(Regex("\n+"), behavior="isolated")])
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=list(SPECIAL_TOKENS) + byte_tokens,
                                      initial_alphabet=["▁", "\n"], show_progress=False)
        trainer_tok.train_from_iterator(_corpus(), trainer)
        model = json.loads(trainer_tok.to_str())["model"]
        _TOKENIZER_PARTS = dict(model["vocab"]), [tuple(m) for m in model["merges"]]
    vocab, merges = _TOKENIZER_PARTS
    return dict(vocab), list(merges)


def tokenizer():
    """transformers' ``GemmaTokenizer`` on the tiny vocabulary: adds ``<bos>`` (as the real one does), pads left,
    the turn and image markers are special tokens, and ``boi_token``/``eoi_token``/``image_token`` name the image
    markers (what ``Gemma3Processor`` reads)."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    vocab, merges = _vocab_and_merges()
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                         extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[5:]],
                   special_tokens=True)
    return tok


def _processor(tok, tile: int, mm_tokens: int, **image_kw):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    image_processor = Gemma3ImageProcessorPil(**{**REAL_IMAGE, "size": {"height": tile, "width": tile}, **image_kw})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=chat_template(),
                           image_seq_length=mm_tokens)


def _token_ids(tok) -> dict[str, int]:
    return dict(boi_token_index=tok.convert_tokens_to_ids(BOI), eoi_token_index=tok.convert_tokens_to_ids(EOI),
                image_token_index=tok.convert_tokens_to_ids(IMAGE))


def build(n_layers: int = 3, seed: int = 0):
    """(model.eval(), processor): a tiny random Gemma 3 and its offline processor (see the module docstring).

    Gemma initialises its RMSNorm weights and the projector's ``mm_input_projection_weight`` to zero (the norms
    scale by ``1 + weight``); here they get seeded random values so a lost ``1 +`` or a dropped image feature
    shows in a test."""
    import transformers

    tok = tokenizer()
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=TILE, patch_size=PATCH,
                                             vision_use_head=False)
    text = transformers.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=1024,
        sliding_window=SLIDING_WINDOW, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        layer_types=["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(n_layers)])
    cfg = transformers.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=MM_TOKENS,
                                    **_token_ids(tok))
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
            elif "norm" in name and "language_model" in name:  # Gemma3RMSNorm gains (1 + weight)
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), _processor(tok, TILE, MM_TOKENS)


def real_settings(**image_kw):
    """(config, processor) with google/gemma-3-4b-it's image settings, built offline without weights: SigLIP 896 px,
    patch 14 (64x64 patches), 256 soft tokens (pooled 4x4), the processor's ``image_seq_length`` 256. The token ids
    are the tiny tokenizer's (the real ones are :data:`REAL_TOKEN_IDS`) so counts can be read off ``input_ids``."""
    import transformers

    tok = tokenizer()
    cfg = transformers.Gemma3Config(vision_config=transformers.SiglipVisionConfig(**REAL_VISION),
                                    text_config=transformers.Gemma3TextConfig(**REAL_TEXT),
                                    mm_tokens_per_image=REAL_MM_TOKENS, **_token_ids(tok))
    return cfg, _processor(tok, REAL_VISION["image_size"], REAL_MM_TOKENS, **image_kw)
