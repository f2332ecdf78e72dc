"""Model building blocks: attention, Transformer blocks, the causal LM and its transformers interop."""
