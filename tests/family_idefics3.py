"""A tiny random Idefics3 (transformers' ``Idefics3ForConditionalGeneration``) with an offline processor.

Everything is built from config: no download. The processor is the real ``Idefics3Processor`` with the real chat
template of HuggingFaceM4/Idefics3-8B-Llama3 (``tests/data/chat_templates/idefics3.jinja``), a byte-level BPE
trained in a few milliseconds on the project's prompts (the Llama 3 pre-tokenizer; BOS added by the post-processor
as Llama 3 does; the Idefics3 special and marker tokens as single tokens), and a PIL image processor with the real
structure at a small scale: the longest edge resized to 64 px, then to multiples of the 32 px tile, split into
row-major tiles plus the whole image squashed to one tile (the global image). The vision tower cuts a tile into
8x8 patches of 4 px and the connector's pixel shuffle (scale factor 2) makes 4x4 = 16 tokens per tile, so a
square image takes 2x2 tiles + global = 80 image tokens. :func:`real_settings`: the 8B's image settings without
weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

CKPT = "HuggingFaceM4/Idefics3-8B-Llama3"
TEMPLATE_PATH = Path(__file__).resolve().parent / "data" / "chat_templates" / "idefics3.jinja"

BOS, EOS, PAD = "<|begin_of_text|>", "<end_of_utterance>", "<|reserved_special_token_0|>"
FAKE, IMAGE, GLOBAL = "<fake_token_around_image>", "<image>", "<global-img>"
ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
# Llama 3's specials first (bos, eos of text, pad = <|reserved_special_token_0|>: Idefics3Config's pad_token_id
# 128002), then the three tokens Idefics3 adds (128256..128258 in the real tokenizer), then the tile markers.
SPECIAL_TOKENS = (BOS, "<|end_of_text|>", PAD, FAKE, IMAGE, EOS, GLOBAL, *ROW_COL)
# Llama 3's pre-tokenizer split (tokenizer.json of Meta-Llama-3): "\n\n" is one pre-token (one token there).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
TILE, PATCH, SCALE, LONGEST = 32, 4, 2, 64
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE**2  # tokens per tile: 16
BPE_VOCAB = 400

# HuggingFaceM4/Idefics3-8B-Llama3: config.json (SigLIP-so400m tower at 364 px, patch 14; scale_factor 2; Llama 3.1
# 8B text) and preprocessor_config.json / processor_config.json (longest edge 4 * 364, tiles of 364, 169 tokens).
REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=364, patch_size=14)
REAL_TEXT = dict(vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
                 bos_token_id=128000, pad_token_id=128002)
REAL_IMAGE = dict(size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364}, do_image_splitting=True,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
REAL_IMAGE_TOKEN_ID, REAL_SCALE, REAL_IMAGE_SEQ_LEN = 128257, 2, 169


def chat_template() -> str:
    """The chat template of HuggingFaceM4/Idefics3-8B-Llama3, verbatim."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def _corpus() -> list[str]:
    from lineofsight import prompts, toy

    texts = [v for v in vars(prompts).values() if isinstance(v, str)] + list(prompts.ROLLOUT_QUESTIONS)
    words = list(toy.CLASSES) + list(toy.COLOURS) + ["small", "medium", "large", "yes", "no", "shape", "image"]
    texts += [" ".join(words), "User: ", "User:", "Assistant: ", "Assistant:"]
    texts += ["\n\n"] * 50  # Llama 3 writes "\n\n" as one token; the tile expansion ends in "\n\n"
    texts += [f"A {c} {s}." for c in toy.COLOURS for s in toy.CLASSES]
    texts += [f"Assistant: {letter}" for letter in prompts.MC_LETTERS] * 20  # " A" is one Llama 3 token
    return texts


def tokenizer():
    """A fast tokenizer (transformers' ``PreTrainedTokenizerFast``, the real one's class) over a byte-level BPE
    trained on the project's prompts with Llama 3's pre-tokenizer; BOS ``<|begin_of_text|>`` added in front of
    every text by the post-processor (as Llama 3's); eos ``<end_of_utterance>``, pad
    ``<|reserved_special_token_0|>``, left padding, no unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens=[FAKE, IMAGE, GLOBAL, *ROW_COL], padding_side="left",
                                   model_max_length=8192, clean_up_tokenization_spaces=False)


def image_processor(**overrides):
    from transformers import Idefics3ImageProcessorPil

    settings = dict(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE}, do_image_splitting=True,
                    image_mean=REAL_IMAGE["image_mean"], image_std=REAL_IMAGE["image_std"])
    settings.update(overrides)
    return Idefics3ImageProcessorPil(**settings)


def processor(tok=None, image_settings: dict | None = None, image_seq_len: int = IMAGE_SEQ_LEN):
    from transformers import Idefics3Processor

    return Idefics3Processor(image_processor=image_processor(**(image_settings or {})),
                             tokenizer=tok if tok is not None else tokenizer(), image_seq_len=image_seq_len,
                             chat_template=chat_template())


def config(tok, n_layers: int = 3):
    from transformers import Idefics3Config

    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
                  patch_size=PATCH)
    return Idefics3Config(text_config=text, vision_config=vision, scale_factor=SCALE,
                          image_token_id=tok.convert_tokens_to_ids(IMAGE), pad_token_id=tok.pad_token_id)


def build(n_layers: int = 3, seed: int = 0):
    """(model.eval(), processor): a tiny random Idefics3 and its offline processor."""
    from transformers import Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    proc = processor()
    model = Idefics3ForConditionalGeneration(config(proc.tokenizer, n_layers))
    return model.eval(), proc


def real_settings():
    """(config, processor) with HuggingFaceM4/Idefics3-8B-Llama3's real sizes and image settings, no weights (the
    tokenizer is the tiny one; only its image-token handling matters for token counts)."""
    from transformers import Idefics3Config

    tok = tokenizer()
    cfg = Idefics3Config(text_config=dict(model_type="llama", **REAL_TEXT), vision_config=REAL_VISION,
                         scale_factor=REAL_SCALE, image_token_id=REAL_IMAGE_TOKEN_ID)
    return cfg, processor(tok, image_settings=REAL_IMAGE, image_seq_len=REAL_IMAGE_SEQ_LEN)
