"""Masked Extended Attention and Leffa attention flow, in plain PyTorch (no ComfyUI import)."""
