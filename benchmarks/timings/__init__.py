"""Timings of the fast paths against their reference paths in the same run: sampling, training step, tokenizer
encode, input pipeline, per-stage and per-kernel profiles, and the helpers they share."""
