"""A tiny BLIP captioner in the real architecture, saved with ``save_pretrained``.

``BlipForConditionalGeneration`` (ViT image encoder + BERT-style text decoder with cross-attention)
at toy size, with a ``BlipProcessor`` made of a ``BlipImageProcessor`` and a ``BertTokenizer`` over a
local ``vocab.txt``: BERT's special tokens, BLIP's ``[DEC]`` decoder-start token, then ``words``, each a
single token. Special-token ids follow the real Salesforce/blip-* checkpoints' roles:
``bos_token_id`` = [DEC] (decoder start), ``sep_token_id`` = [SEP] (ends a caption), ``pad_token_id`` = [PAD].
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
DEFAULT_WORDS = (
    "a picture of photo an the and above below left right next to on with in small large big "
    "red green blue yellow white black orange purple gray circle square triangle background"
).split()


def write_blip_tokenizer(folder: Path, words: Sequence[str]):
    """A BertTokenizer over ``SPECIAL_TOKENS + words`` (lower-cased, de-duplicated), saved in ``folder``."""
    from transformers import BertTokenizer  # deferred: heavy (transformers)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIAL_TOKENS)
    for word in words:
        w = word.strip().lower()
        if w and w not in vocab:
            vocab.append(w)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, bos_token="[DEC]")
    return tokenizer


def build_tiny_blip(
    folder: Path | str,
    words: Sequence[str] = DEFAULT_WORDS,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> Path:
    """Build a random tiny BLIP captioner + processor and ``save_pretrained`` both into ``folder``."""
    from transformers import (  # deferred: heavy (transformers)
        BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor)

    folder = Path(folder)
    tokenizer = write_blip_tokenizer(folder, words)
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, encoder_hidden_size=hidden_size,
        intermediate_size=hidden_size * 4, projection_dim=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=64,
        bos_token_id=ids("[DEC]"), eos_token_id=ids("[SEP]"), sep_token_id=ids("[SEP]"), pad_token_id=ids("[PAD]"),
    )
    vision_config = dict(
        hidden_size=hidden_size, intermediate_size=hidden_size * 4, projection_dim=hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
        initializer_range=0.02,
    )
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=hidden_size,
                        image_text_hidden_size=hidden_size)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
