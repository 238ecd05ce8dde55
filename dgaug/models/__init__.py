"""Model loaders: latent diffusion, CLIP and the tokenizer they share, apart from any recipe."""
