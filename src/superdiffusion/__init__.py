"""superdiffusion: semi-supervised biomedical image segmentation with a diffusion teacher and a student.

The package reads one way, stage by stage: config -> data -> nets/diffusion -> methods -> engine ->
evaluation, with the command line in `cli`.
"""

__version__ = "0.1.0"
