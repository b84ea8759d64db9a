from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

from lib.config import HParams, ModelConfig, PreprocConfig, SamplerConfig, TrainConfig, VLMConfig, FlowConfig
from lib.vlm import make_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DFM_SHARED_DATA", ROOT.parent / "shared" / "data"))
CXR = SHARED / "cxr_lung"
BRATS = SHARED / "brats_wt"

requires_cxr = pytest.mark.skipif(not (CXR / "datalist.json").exists(),
                                  reason=f"real chest X-ray data not found at {CXR} (CI has ../shared/data)")
requires_brats = pytest.mark.skipif(not BRATS.exists(), reason=f"BraTS data not found at {BRATS} (CI has ../shared/data)")

logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP written with save_pretrained; loaded through the same from_pretrained path as real ones."""
    return make_tiny_clip(tmp_path_factory.mktemp("vlm") / "tiny-clip", image_size=32, hidden=32, projection_dim=16)


def tiny_hparams(clip: Path | None, spatial_dims: int = 2, features=(8, 16, 32), patch=None, channels: int = 1,
                 text_mode: str = "label", stages=None, mode: str = "dfm", spacing=None, steps: int = 3,
                 arch: str = "unet", precision: str = "fp32") -> HParams:
    """Tiny hyper-parameters; fp32 so that exact comparisons hold on every CPU (the bf16 policy has its own tests)."""
    patch = list(patch or ([32, 32] if spatial_dims == 2 else [16, 16, 16]))
    return HParams(
        model=ModelConfig(spatial_dims=spatial_dims, in_channels=channels, features=tuple(features),
                          time_embed_dim=16, vlm_film_decoder_stages=stages, mode=mode, arch=arch),
        flow=FlowConfig(scheduler="polynomial", exponent=2.0),
        sampler=SamplerConfig(name="euler", steps=steps, sw_batch_size=4, overlap=0.25),
        vlm=VLMConfig(name_or_path=str(clip) if clip and mode == "dfm" else None, text_mode=text_mode,
                      prompt="a bright blob", intensity_window=(-1.0, 2.0),
                      axcodes="RAS" if spatial_dims == 3 else None),
        preprocessing=PreprocConfig(spatial_dims=spatial_dims, num_channels=channels, spacing=spacing,
                                    intensity={"type": "none"}, label_threshold=0.0, patch_size=patch),
        train=TrainConfig(lr=3e-3, images_per_batch=2, patches_per_image=2, val_every_s=1e9, augment=False),
        labels={"blob": 1},
        precision=precision,
    )


def serve_in_app(tmp_path: Path, hp: HParams, conf: dict | None = None, film_std: float | None = None):
    """The app's task config (``dfm_vlm_2d`` or ``dfm_vlm_3d`` by ``hp``'s dimension) serving a model built from
    ``hp`` (seed 0; FiLM heads drawn with ``film_std`` to make the conditioning matter), saved as its
    ``--conf <name>_checkpoint`` under ``tmp_path/models`` -> (config, system, checkpoint path)."""
    from lib.checkpoint import save_checkpoint
    from lib.configs.dfm_vlm_2d import DFMVLM2D
    from lib.configs.dfm_vlm_3d import DFMVLM3D
    from lib.training import build_system

    name, cls = ("dfm_vlm_3d", DFMVLM3D) if hp.preprocessing.spatial_dims == 3 else ("dfm_vlm_2d", DFMVLM2D)
    torch.manual_seed(0)
    system = build_system(hp)
    if film_std is not None:
        with torch.no_grad():
            for h in system.model.vlm_film_heads.values():
                h.weight.normal_(0, film_std)
    path = tmp_path / "models" / f"{name}.pt"
    save_checkpoint(path, system.model, system.hparams)
    cfg = cls()
    cfg.init(name, str(tmp_path / "model"), {f"{name}_checkpoint": str(path), **(conf or {})}, None)
    return cfg, system, path


@pytest.fixture
def make_system(tiny_clip):
    from lib.training import build_system

    def _make(**kw):
        torch.manual_seed(kw.pop("seed", 0))
        return build_system(tiny_hparams(tiny_clip, **kw))

    return _make


@pytest.fixture(autouse=True)
def _fresh_server_environment(monkeypatch):
    """Each test is a fresh server: no model's start time (``DFM_STALE_BEFORE_*``, which an app config sets for
    MONAI Label's subprocesses) carries over from an earlier test."""
    for k in [k for k in os.environ if k.startswith("DFM_STALE_BEFORE_")]:
        monkeypatch.delenv(k)
