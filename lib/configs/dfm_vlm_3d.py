"""3D DFM+VLM model for CT/MR volumes (sample data: phantom lesions and vertebrae, chosen by prompt)."""

from lib.configs._common import DFMTaskConfig


class DFMVLM3D(DFMTaskConfig):
    PRESET = "dfm_vlm_3d"
    DESCRIPTION = "3D binary discrete flow matching segmentation conditioned by a CLIP-family VLM (CT/MR)"
