"""What every method's training and sampling shares: the loop (progress, checkpoints, exact
resume), LoRA files, latents and prompts, the denoising maths, artefact records and the
sampling pipeline. Methods build on this; nothing here names a method."""
