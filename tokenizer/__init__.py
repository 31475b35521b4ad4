"""The VQVAE tokenizer's training code (VAR, arXiv 2404.02905, section 3.2): its flags and derived values (`args`),
the builders of a run's parts (`build`), its losses (`lpips`: the perceptual distance; `discriminator`: the patch
discriminator, its losses and VQGAN's adaptive weight), codebook upkeep (`codebook`) and reconstruction metrics
(`metrics`). The model itself is `models.VQVAE`; nothing is imported here, so `import tokenizer` stays cheap."""
