"""Training diffusion priors (EDM denoiser loss) on your own images or the built-in generators."""
