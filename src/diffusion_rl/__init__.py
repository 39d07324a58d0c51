"""diffusion_rl: reward fine-tuning of diffusion models, reproduced from raw data to tables."""
