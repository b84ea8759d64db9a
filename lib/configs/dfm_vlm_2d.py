"""2D DFM+VLM model for X-rays (radiographs, e.g. lung fields)."""

from lib.configs._common import DFMTaskConfig


class DFMVLM2D(DFMTaskConfig):
    PRESET = "dfm_vlm_2d"
    DESCRIPTION = "2D binary discrete flow matching segmentation conditioned by a CLIP-family VLM (X-ray)"
