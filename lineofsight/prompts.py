"""Every prompt the project asks a model, spelled once.

The toy model is trained on these strings (``scripts/train_toy_vlm.py``) and the evaluations ask
them (``steering/``, ``sae/``, :mod:`lineofsight.toy`), so a change here changes both sides.
Questions are plain text; :func:`lineofsight.models.format_prompt` puts them into a model's
prompt format.
"""

from __future__ import annotations

__all__ = [
    "CAPTION_QUESTION",
    "COLOUR_YESNO_TEMPLATE",
    "FORCED_CHOICE_TEMPLATE",
    "MISTRAL_PROMPT",
    "MISTRAL_TEXT_PROMPT",
    "ROLLOUT_QUESTIONS",
    "YESNO_TEMPLATE",
]

CAPTION_QUESTION = "What is shown in this image?"
"""The paper's caption question: the SAE harvest's pass 1, the damage measurement, rollout question 1."""

FORCED_CHOICE_TEMPLATE = (
    'Reply either "{a}" or "{b}" in lowercase depending on what is shown in the image. '
    "Do not output any other text."
)
"""The paper's steering-efficacy prompt; ``{a}`` and ``{b}`` are the two class names (the order
alternates between images). The answer's first token is the class word itself."""

ROLLOUT_QUESTIONS: tuple[str, ...] = (
    CAPTION_QUESTION,
    'Is this image related in any way to the concept "{src}"?',
    'Is this image related in any way to the concept "{tgt}"?',
    "Describe the primary purpose or function of the entity shown in this image.",
    "If you were to explain this image to a child, what analogy or simplified description would you use?",
    "In what environment or setting would you most likely encounter this?",
    "What are some key distinctive features or characteristics that make this thing unique?",
    "Describe this image in detail.",
    "How large is the main subject of this image typically?",
    'Is this image more related to the concept "{src}" or the concept "{tgt}"?',
)
"""The paper's ten rollout questions; ``{src}`` and ``{tgt}`` become the pair's class names."""

YESNO_TEMPLATE = "Is there a {name} in this image?"
"""The toy world's yes/no question about a class."""
COLOUR_YESNO_TEMPLATE = "Is the shape {colour}?"
"""The toy world's yes/no question about the shape's colour."""

MISTRAL_PROMPT = "[INST] {image}\n{question} [/INST]"
"""The LLaVA-NeXT-Mistral prompt with an image, used when a processor has no chat template."""
MISTRAL_TEXT_PROMPT = "[INST] {question} [/INST]"
"""The same without an image."""
