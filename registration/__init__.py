"""Stage 1 of the method (docs/method.md §1-§2), plain PyTorch: the stage-1 recipe (``recipe``: the feature pass's
constants and noise, the masks at the feature grid, matches → MLS warp → double mask), the control-point value
(``matches``), the working crop and its paste back (``crop``) and the registration previews (``previews``).
No ComfyUI import; ``nodes/`` adapts it to ComfyUI's types."""
