"""A local stand-in for the papers' text encoder: a BERT of the papers' width (768) with random weights.

The papers embed captions with bert-base-uncased, which cannot be downloaded here. What the rest of the pipeline
sees of it is a 768-d CLS embedding per caption, so a BERT built from a `BertConfig` of that width, saved with a
tokenizer, exercises every shape of the papers' stack (a 768 -> 2304 text head, 768-d synthetic texts) offline.
Its vocabulary is character pieces (a-z, 0-9 and their ## continuations), so every caption tokenizes and distinct
captions get distinct embeddings. Not a language model: for shapes, memory and speed only.

    python -m mmdd.bench.standin <folder>      # then model.text.name_or_path=<folder>
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_bert_standin(folder: str | Path, hidden: int = 768, layers: int = 2, heads: int = 12, seed: int = 0) -> Path:
    """Write a random-weight BERT (`hidden` wide, `layers` deep) and its tokenizer to `folder`; returns it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = list(string.ascii_lowercase + string.digits) + list(".,;:!?'\"-()&/")
    vocab = SPECIAL + pieces + [f"##{p}" for p in pieces]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=512)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(folder))
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mmdd.bench.standin <folder>")
    print(write_bert_standin(sys.argv[1]))
