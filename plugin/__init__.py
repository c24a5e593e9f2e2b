"""LoRA fine-tuning plugin for Diffusers pipelines (SD 1.x/2.x, SDXL, SD3, Flux)."""
