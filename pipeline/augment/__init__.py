"""LoRA diffusion augmentation (DESIGN 1.3): fine-tune Stable Diffusion on a few images, then
generate variations of each shot with img2img.

``images`` (resizing, colour jitter, the training views), ``lora_training`` (pivotal tuning:
textual inversion, then LoRA), ``lora_files`` (LoRA and token files: write, read, load),
``generation`` (img2img variations and their seeds).
"""
