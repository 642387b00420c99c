"""Pieces shared by the tiny random-weight twins: a tokenizer built offline from a small vocabulary, and
the Wan family's UMT5 text encoder saved the way the real checkpoints are."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
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


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Words split at spaces and punctuation; every non-ASCII character (Chinese) is a token of its own.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Split(Regex(r"[^\x00-\x7F]"), behavior="isolated")]
    )


def word_level_tokenizer(vocab_size: int, text: str = "") -> PreTrainedTokenizerFast:
    """A T5-style tokenizer (pad 0, eos 1, unk 2, `</s>` appended) over `WORDS` and every piece of `text`.

    `text` is the model's default negative prompt, so the twin encodes it token by token (not as a row of
    `<unk>`), and a test can tell it from another prompt.
    """
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    pre = _pre_tokenizer()
    for word in [*WORDS, *(piece for piece, _ in pre.pre_tokenize_str(text))]:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= vocab_size
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_umt5(vocabulary: str = "") -> tuple[UMT5EncoderModel, PreTrainedTokenizerFast]:
    """The Wan family's text encoder (UMT5, as in the real checkpoints) at toy size, with its tokenizer
    (which also knows the pieces of `vocabulary`). Save it with `save_untied_like_wan`.

    Call after seeding torch: the weights are random.
    """
    config = UMT5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return UMT5EncoderModel(config), word_level_tokenizer(config.vocab_size, vocabulary)


def save_untied_like_wan(text_encoder_folder: Path) -> None:
    """Make a saved UMT5 encoder look like Wan's: `tie_word_embeddings: false` in its config.

    save_pretrained already stores only `shared.weight` (the encoder's embedding is tied to it); Wan's
    published text encoders carry the same single tensor but the untied flag, which early transformers
    5.x releases read as "leave `encoder.embed_tokens` uninitialised" (transformers PR #43880). A twin
    saved this way makes that bug show in the tests instead of only with real weights.
    """
    path = text_encoder_folder / "config.json"
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
