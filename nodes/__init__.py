"""ComfyUI face of the pack: node classes, model patching, IMAGE/MASK/LATENT conversion."""
