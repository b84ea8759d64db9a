"""DFM+VLM: binary discrete flow matching segmentation conditioned by a vision-language model.

The core (everything in ``lib`` except ``lib.configs``, ``lib.infers``, ``lib.trainers`` and
``lib.activelearning``) does not import MONAI Label, so it can be used from a script, a bundle or a notebook.
"""

__version__ = "0.1.0"
