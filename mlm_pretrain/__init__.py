"""mlm-pretrain: train a tokenizer, stream a corpus, pretrain an encoder, fine-tune it."""

__version__ = "0.1.0"
