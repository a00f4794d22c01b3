"""Plain-PyTorch helpers every core folder may use (``attention/``, ``warping/``, ``registration/``): masks (the one
mask normaliser, morphology, token grids), image preparation, and the one ``(height, width)`` check. No ComfyUI
import; nothing here knows about a node or a host."""
