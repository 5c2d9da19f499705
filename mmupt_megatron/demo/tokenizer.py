"""The demo's word-level tokenizer: the words of the synthetic world and chat template, plus Qwen2.5-VL
special tokens.

A tiny model with a 151,936-row output layer would spend most of its compute on the vocabulary
(/work/shared/DEMO.md), so the demo uses ~90 whole-word tokens. Pre-tokenisation splits ``\\boxed{``,
numbers, words and single punctuation marks and drops whitespace; decoding joins tokens with spaces
(``red - blue \\boxed{ 3 }``, whose ``\\boxed{}`` content still extracts as ``3``). The special tokens are
the ones the Qwen2.5-VL chat template and vision placeholders use, so prompts built by
``mmupt_megatron.data.prompts`` tokenise unchanged; ``<|endoftext|>`` pads and ``<|im_end|>`` ends a turn.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmupt_megatron.data import synthetic
from mmupt_megatron.models.tokens import QWEN_SPECIAL_TOKENS

SPECIAL_TOKENS: tuple[str, ...] = QWEN_SPECIAL_TOKENS
UNK_TOKEN = "<unk>"
_TEMPLATE_TEXT = (
    "system You are a helpful assistant . user assistant Please reason step by step , and put your final "
    "answer within \\boxed{ } ."
)
_SYNTHESIS_TEXT = "Answer . Ask a different question about the image < / >"
"""The words of the demo's question-writing prompts and the ``<question>...</question>`` tags."""
_PRE_TOKENIZE = r"\\boxed\{|\d+|[A-Za-z]+|[^\sA-Za-z\d]"


def world_words(max_count: int = 16) -> list[str]:
    """Every word the world, its questions, chains and the chat template use, in a fixed order."""
    words: list[str] = []
    texts = [_TEMPLATE_TEXT, "How many shapes are there ?", synthetic.EMPTY_WORD, synthetic.ALL_WORD,
             _SYNTHESIS_TEXT]
    texts += list(synthetic.COLOURS) + list(synthetic.SHAPES) + list(synthetic.PLURALS.values())
    texts += [str(n) for n in range(max_count + 1)]
    for text in texts:
        for word in text.split():
            if word not in words:
                words.append(word)
    return words


def build_tokenizer(*, extra_words: list[str] | None = None, max_count: int = 16) -> PreTrainedTokenizerFast:
    """A fast tokenizer: ``<unk>``, the world's words, then the special tokens (ids in that order)."""
    words = world_words(max_count) + [w for w in (extra_words or []) if w not in world_words(max_count)]
    vocab = {UNK_TOKEN: 0}
    for word in words:
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PRE_TOKENIZE), behavior="isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK_TOKEN,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",
    )
    # <|im_start|>, <|vision_*|>, <|image_pad|>: special, so they survive tokenisation as single ids
    others = [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]
    tokenizer.add_special_tokens({"additional_special_tokens": others})
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    tokenizer.save_pretrained(str(folder))
