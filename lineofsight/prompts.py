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
    "MC_INSTRUCTION",
    "MC_LETTERS",
    "MISTRAL_PROMPT",
    "MISTRAL_TEXT_PROMPT",
    "ROLLOUT_QUESTIONS",
    "YESNO_TEMPLATE",
    "multiple_choice",
]

CAPTION_QUESTION = "What is shown in this image?"
"""The paper's caption question: the SAE harvest's pass 1, the damage measurement, rollout question 1."""

FORCED_CHOICE_TEMPLATE = (
    ' Reply either "{a}" or "{b}" in lowercase depending on what is shown in the image. '
    "Do not output any other text."
)
"""The paper's steering-efficacy prompt; ``{a}`` and ``{b}`` are the two class names (the order
alternates between images). The leading space is the paper's: its code asked ``[INST] <image>\\n Reply
either ...``, and the Mistral tokenizer reads ``\\n Reply`` as other tokens than ``\\nReply`` (``▁Rep``);
the toy tokenizer splits on whitespace and sees no difference. The model answers with the class name (the
tokens after the prompt: :func:`lineofsight.models.answer_token_ids`)."""

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

MC_LETTERS = "ABCDEFGHIJ"
"""Option letters of a multiple-choice item, in order (MMMU-Pro has up to ten options)."""
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""The direct-answer instruction of LLaVA's multiple-choice evaluations (MMMU, MMMU-Pro "standard", A-OKVQA MC);
the benchmark splice and the toy world's lettered task both ask it."""


def multiple_choice(question: str, options: list[str] | tuple[str, ...]) -> str:
    """A lettered multiple-choice question: the question, one ``A. option`` line per option, the instruction.

    >>> print(multiple_choice("Which shape is shown?", ["circle", "star"]))
    Which shape is shown?
    A. circle
    B. star
    Answer with the option's letter from the given choices directly.
    """
    if not 2 <= len(options) <= len(MC_LETTERS):
        raise ValueError(f"a multiple-choice item needs 2 to {len(MC_LETTERS)} options, got {len(options)}")
    lines = [question.strip(), *(f"{letter}. {option}" for letter, option in zip(MC_LETTERS, options, strict=False))]
    return "\n".join([*lines, MC_INSTRUCTION])


MISTRAL_PROMPT = "[INST] {image}\n{question} [/INST]"
"""The LLaVA-NeXT-Mistral prompt with an image, used when a processor has no chat template."""
MISTRAL_TEXT_PROMPT = "[INST] {question} [/INST]"
"""The same without an image."""
