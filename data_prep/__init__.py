"""Corpus preparation for distil-ja: corpus building, tokenizer training, binarization."""
