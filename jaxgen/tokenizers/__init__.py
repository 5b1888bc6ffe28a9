"""Image tokenizers: continuous (KL-VAE) and discrete (VQ) autoencoders mapping images to latents and back."""
