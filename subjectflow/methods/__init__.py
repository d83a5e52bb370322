"""Method math: losses, samplers and condition transforms, as plain torch/PIL functions.

One module per method of METHODS.md (in the team's shared/ folder); nothing here imports Prefect, DVC, the CLI
or diffusers pipelines, so every function is testable on tiny CPU tensors.

- `sfo`: Subject Fidelity Optimization loss, paired noising, logit-normal timesteps and the
  SFT (DreamBooth) loss it starts from (METHODS.md section 1).
- `cdns`: the pure parts of Condition-Degradation Negative Sampling (METHODS.md section 1).
- `jedi`: the coupled self-attention processor of joint-image diffusion (METHODS.md section 2).
"""
