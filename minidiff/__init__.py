"""minidiff: a small, readable diffusion library, proven equal to diffusers.

Each name below lives in one short file; open it beside the notebooks.
"""

__version__ = "0.1.0"
