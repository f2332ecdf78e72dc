"""Tokenizer, corpus and fine-tuning datasets."""
