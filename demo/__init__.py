"""The offline end-to-end demo: real Fashion-MNIST -> tokenizer -> VAR -> samples and their quality in numbers."""
