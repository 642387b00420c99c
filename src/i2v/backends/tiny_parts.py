"""Pieces shared by the tiny random-weight twins: a tokenizer built offline from a small vocabulary."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

# Enough words for the prompts in the tests and examples; everything else maps to <unk>.
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "in",
    "on",
    "at",
    "with",
    "to",
    "over",
    "under",
    "through",
    "slowly",
    "quickly",
    "camera",
    "pans",
    "zooms",
    "moves",
    "cat",
    "dog",
    "bird",
    "person",
    "woman",
    "man",
    "child",
    "boat",
    "car",
    "tree",
    "sky",
    "sea",
    "sun",
    "moon",
    "city",
    "street",
    "mountain",
    "river",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "bright",
    "dark",
    "night",
    "day",
    "rain",
    "snow",
    "wind",
    "waves",
    "light",
]


def word_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer (pad 0, eos 1, unk 2, `</s>` appended) over `WORDS`, ids below vocab_size."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= vocab_size
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_umt5() -> tuple[UMT5EncoderModel, PreTrainedTokenizerFast]:
    """The Wan family's text encoder (UMT5, as in the real checkpoints) at toy size, with its tokenizer.

    Call after seeding torch: the weights are random.
    """
    config = UMT5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return UMT5EncoderModel(config), word_level_tokenizer(config.vocab_size)
