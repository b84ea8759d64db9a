"""3D DFM+VLM model for CT/MR volumes (the sample data's phantom lesions; retrain on your studies)."""

from lib.configs._common import DFMTaskConfig


class DFMVLM3D(DFMTaskConfig):
    PRESET = "dfm_vlm_3d"
    DESCRIPTION = "3D binary discrete flow matching segmentation conditioned by a CLIP-family VLM (CT/MR)"
