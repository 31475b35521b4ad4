"""GPU correctness checks run as whole jobs: FSDP and activation checkpointing on one GPU, a short train.py run from
images and from tokens, and the synthetic data set they train on."""
