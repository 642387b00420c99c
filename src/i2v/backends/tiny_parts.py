"""Pieces shared by the tiny random-weight twins: a tokenizer built offline from a small vocabulary."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Enough words for the prompts in the tests and examples; everything else maps to <unk>.
WORDS = ["a", "an", "the", "of", "and", "in", "on", "at", "with", "to", "over", "under", "through", "slowly", "quickly", "camera", "pans", "zooms", "moves", "cat", "dog", "bird", "person", "woman", "man", "child", "boat", "car", "tree", "sky", "sea", "sun", "moon", "city", "street", "mountain", "river", "red", "blue", "green", "yellow", "white", "black", "bright", "dark", "night", "day", "rain", "snow", "wind", "waves", "light"]


def word_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer (pad 0, eos 1, unk 2, `</s>` appended) over `WORDS`, ids below vocab_size."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= vocab_size
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
