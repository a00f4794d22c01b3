"""Host adapters other than ComfyUI's (``nodes/`` is the ComfyUI one): each routes a host's attention layers into
the same core (``attention/policy.py``, ``attention/masked_extended.py``, ``attention/flow.py``).

``diffusers_processor`` needs the optional ``diffusers`` extra; nothing of the pack imports it.
"""
