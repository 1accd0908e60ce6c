"""Building blocks of the latent diffusion model (mcLDM)."""
