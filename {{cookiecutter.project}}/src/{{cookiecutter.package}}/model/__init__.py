"""Model building blocks: attention, Transformer blocks, the causal LM and its transformers interop; seq2seq.py is
an encoder-decoder built from the same blocks, with an example that trains in seconds."""
