"""VLM conditioning: a frozen Hugging Face CLIP-family model, and the ONE function that turns patches into ``cond``.

:func:`patch_condition` is called by training for every random patch and by the sliding-window inferer for every
window: the same code, on the same kind of input (a preprocessed patch of the patch/roi size), never on the whole
image. How a patch becomes the VLM's input:

1. 2D views, as a radiologist sees them (``view="display"``; a pretrained CLIP was trained on upright photographs).
   A 2D patch is one view: MONAI loads a PNG as (x, y), so the view is its transpose (rows top to bottom, columns
   left to right, as the file displays). A 3D patch gives ``num_slices`` evenly spaced axial slices (along the S/I
   axis named by the preprocessing's orientation codes, ``vlm.axcodes``), slice ``i`` at index
   ``floor((i + 0.5) * D / num_slices)``, each in the radiological convention: anterior at the top, the patient's
   right on the image's left (seen from the feet); their embeddings are mean-pooled. ``view="array"`` (checkpoints
   from before 2026-11-28) feeds the array's own axes: a PNG transposed, 3D slices along the last axis.
2. A fixed intensity window ``(low, high)`` (in preprocessed units) maps each view to [0, 1], clipped; no
   per-window normalisation, so the mapping is the same wherever the patch comes from.
3. Channels to RGB: 1 channel is replicated, 2 channels become ``(c0, c1, (c0 + c1) / 2)``, 3 or more: the first
   three.
4. The model's own processor (resize, crop, mean/std normalisation; ``do_rescale=False`` since views are already
   in [0, 1]) and ``get_image_features``; the embedding is L2-normalised.
5. Text (optional): ``text_mode="label"`` uses one prompt (``vlm.prompt``) for every patch, in training and in
   inference alike (an image's ``text`` is ignored; a prompted model's free prompt is the one deliberate
   override), ``"image"`` the datalist entry's ``text``; its L2-normalised ``get_text_features`` embedding
   (texts truncated to the text model's positions) is concatenated after the image embedding. A missing text is
   an error, never a zero vector.

Views must be square (``HParams.resolved`` refuses a non-square VLM view): a CLIP processor resizes the shortest
edge and centre-crops, so the outer parts of a non-square window would never be seen. A checkpoint records the
VLM's fingerprint (:attr:`VLMEncoder.fingerprint`) and refuses another VLM of the same embedding size.

Weights are loaded with ``from_pretrained`` from a local folder or a hub id; nothing here downloads unless the id
is a hub id and the machine is online. :func:`make_tiny_clip` writes a tiny random CLIP for tests and demos.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import VLMConfig

logger = logging.getLogger(__name__)


class VLMError(ValueError):
    """The VLM or its inputs (texts) are missing or unusable."""


TEXT_CACHE_SIZE = 1024  # text embeddings kept per encoder (least recently used dropped): a server's free prompts
FINGERPRINT_PROBE_TEXT = "a medical image"
FINGERPRINT_COMPONENTS = 8
FINGERPRINT_TOLERANCE = 2e-3  # per probe component (L2-normalised embeddings); fp32 reloads agree to ~1e-7


# the probe embedded at a size no processor takes as it is (a tiny CLIP's is 32, CLIP's 224): the processor's resize
# (its resample filter, crop) is part of what the windows are embedded through, and a VLM folder whose processor
# resamples otherwise changed predictions by up to 0.15 and passed the 32-pixel probe (a review, 2026-12-08)
RESIZED_PROBE_SIZE = 61


def _probe_image(size: int = 32) -> torch.Tensor:
    """A fixed (3, size, size) view in [0, 1]: the image every fingerprint embeds."""
    i = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    return torch.stack([(xx / (size - 1)), (yy / (size - 1)), ((7 * xx + 3 * yy) % 17) / 16.0])


def _project(emb: torch.Tensor) -> list[float]:
    """An L2-normalised embedding -> FINGERPRINT_COMPONENTS fixed (cosine-basis) projections, rounded: every
    component of the embedding contributes; no random numbers, so the basis is the same in every version."""
    d = emb.numel()
    n = torch.arange(d, dtype=torch.float64)
    basis = torch.stack([torch.cos(math.pi * (n + 0.5) * (k + 1) / d) for k in range(FINGERPRINT_COMPONENTS)])
    basis = basis / basis.norm(dim=1, keepdim=True)
    return [round(float(v), 6) for v in basis @ emb.double().cpu()]


def fingerprint_mismatch(recorded: dict | None, actual: dict | None, tol: float = FINGERPRINT_TOLERANCE) -> str | None:
    """Why two VLM fingerprints (:meth:`VLMEncoder.fingerprint`) name different models; None when they agree (or
    one is unknown: a checkpoint from before fingerprints). ``source`` (local folder or hub) is not compared: the
    same weights may move."""
    if not recorded or not actual:
        return None
    for k in ("model_type", "image_embed_dim", "text_embed_dim"):
        if k in recorded and k in actual and recorded[k] is not None and actual[k] is not None \
                and recorded[k] != actual[k]:
            return f"{k} {recorded[k]!r} vs {actual[k]!r}"
    for k in ("image_probe", "text_probe", "resized_probe"):  # (resized_probe: recorded since 2026-12-08)
        a, b = recorded.get(k), actual.get(k)
        if a is None or b is None:
            continue
        if len(a) != len(b):
            return f"{k} of {len(a)} vs {len(b)} components"
        worst = max(abs(float(x) - float(y)) for x, y in zip(a, b))
        if worst > tol:
            return f"{k} differs by {worst:.3g} (tolerance {tol:g})"
    return None


def describe_fingerprint(fp: dict | None) -> str:
    if not fp:
        return "no fingerprint"
    probe, text = fp.get("image_probe") or [], fp.get("text_probe") or []
    return (f"{fp.get('model_type')}, {fp.get('image_embed_dim')}-d image / {fp.get('text_embed_dim')}-d text, "
            f"image probe {[round(v, 3) for v in probe[:3]]}"
            + (f", text probe {[round(v, 3) for v in text[:3]]}" if text else ""))  # (either may be what differs)


def _features(out) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features; transformers 5 a model output with pooler_output."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    raise VLMError(f"unexpected output of the VLM's feature method: {type(out).__name__}")


def axial_slice_indices(depth: int, num_slices: int) -> list[int]:
    return [min(depth - 1, int((i + 0.5) * depth / num_slices)) for i in range(num_slices)]


class VLMEncoder(nn.Module):
    """Frozen CLIP / SigLIP (``AutoModel`` + its processor) with the patch-to-view rules above."""

    def __init__(self, model: nn.Module, image_processor, tokenizer, cfg: VLMConfig):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.cfg = cfg
        # least recently used entries dropped beyond TEXT_CACHE_SIZE (a server's free prompts are unbounded)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_lock = threading.Lock()
        self.text_cache_size = TEXT_CACHE_SIZE
        self.source = "local"  # "hub" when from_pretrained loaded a hub id (recorded in the fingerprint)
        self.text_center: torch.Tensor | None = None  # a prompted model's prompt mean (center_texts_on)
        with torch.no_grad():
            dummy = torch.zeros(3, 16, 16)
            pix = self.image_processor(images=[dummy], return_tensors="pt", do_rescale=False)["pixel_values"]
            self.image_embed_dim = int(_features(self.model.get_image_features(pixel_values=pix)).shape[-1])
        self.text_embed_dim = None
        if tokenizer is not None and hasattr(self.model, "get_text_features"):
            self.text_embed_dim = int(self._encode_text_uncached(["a"]).shape[-1])
        self._probes = self._probe_embeddings()

    @torch.no_grad()
    def _probe_embeddings(self) -> dict:
        """The fixed probe image (and text) embedded in fp32, whatever autocast the caller runs under."""
        with torch.autocast(self.device.type, enabled=False):
            def embed(size: int) -> torch.Tensor:
                pix = self.image_processor(images=[_probe_image(size)], return_tensors="pt",
                                           do_rescale=False)["pixel_values"]
                return F.normalize(_features(self.model.get_image_features(
                    pixel_values=pix.to(self.device, torch.float32))).float(), dim=-1)[0]

            img, resized = embed(32), embed(RESIZED_PROBE_SIZE)
            txt = None
            if self.tokenizer is not None and self.text_embed_dim is not None:
                txt = self._encode_text_uncached([FINGERPRINT_PROBE_TEXT])[0]
        return {"image_probe": _project(img), "text_probe": None if txt is None else _project(txt),
                "resized_probe": _project(resized)}

    @property
    def fingerprint(self) -> dict:
        """What identifies this VLM beyond its embedding sizes (recorded in checkpoints as ``vlm.fingerprint``):
        model type, embedding sizes and fixed projections of its L2-normalised embeddings of a fixed probe image
        and (with a tokenizer) text. Compared with a tolerance (:func:`fingerprint_mismatch`), never bit for bit."""
        return {"model_type": str(getattr(self.model.config, "model_type", "")),
                "image_embed_dim": self.image_embed_dim, "text_embed_dim": self.text_embed_dim,
                "source": self.source, **self._probes}

    def train(self, mode: bool = True) -> "VLMEncoder":
        """The VLM is frozen: it stays in eval mode (no dropout, fixed norm statistics) whatever its container does."""
        super().train(mode)
        self.model.eval()
        return self

    @classmethod
    def from_pretrained(cls, cfg: VLMConfig, device: str | torch.device | None = None,
                        local_files_only: bool = False) -> "VLMEncoder":
        """``local_files_only``: a hub id is looked up in the local Hugging Face cache only (never on the Hub)."""
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if not cfg.name_or_path:
            raise VLMError("no VLM given (vlm.name_or_path is empty)")
        src = str(cfg.name_or_path)
        local = Path(src).expanduser()
        if local.exists():
            src = str(local)
        elif src.startswith((".", "/", "~")) or src.count("/") > 1:  # a hub id is "name" or "owner/name"
            raise VLMError(f"VLM folder {cfg.name_or_path!r} does not exist (the presets name a random tiny CLIP "
                           f"for demos and benches, made by `python -m lib make-tiny-vlm {cfg.name_or_path}`; or "
                           f"give a real VLM folder or hub id with --vlm)")
        hub = not local.exists()
        kw = {"local_files_only": True} if local_files_only else {}
        try:
            # fp32 whatever the weights were saved in (a VLM saved in fp16/bf16 ran in it on the CPU: slow on AVX2, and
            # not the fp32 the text and probe embeddings are said to be in; a review); autocast still applies
            model = AutoModel.from_pretrained(src, dtype=torch.float32, **kw)
            image_processor = AutoImageProcessor.from_pretrained(src, **kw)
        except (OSError, ValueError) as e:
            raise VLMError(f"cannot load the VLM {cfg.name_or_path!r} with from_pretrained: {e}") from e
        if not hasattr(model, "get_image_features"):
            raise VLMError(f"{cfg.name_or_path!r} is a {type(model).__name__}, not a CLIP-family model "
                           "(no get_image_features)")
        tokenizer = None
        if cfg.text_mode != "none":
            try:
                tokenizer = AutoTokenizer.from_pretrained(src, **kw)
            except (OSError, ValueError) as e:
                raise VLMError(f"text_mode={cfg.text_mode!r} needs the VLM's tokenizer: {e}") from e
            warn = legacy_eos_pooling(model, tokenizer)
            if warn:
                logger.warning("VLM %s: %s", cfg.name_or_path, warn)
        enc = cls(model, image_processor, tokenizer, cfg)
        enc.source = "hub" if hub else "local"
        return enc.to(device) if device is not None else enc

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def resolved_config(self) -> VLMConfig:
        """The VLMConfig with the embedding sizes of the loaded model filled in."""
        import dataclasses

        return dataclasses.replace(self.cfg, image_embed_dim=self.image_embed_dim,
                                   text_embed_dim=self.text_embed_dim if self.cfg.text_mode != "none" else None,
                                   fingerprint=self.fingerprint)

    @property
    def embed_dim(self) -> int:
        return self.resolved_config().embed_dim

    # -- patches -> 2D RGB views in [0, 1] ----------------------------------------------------------------------
    def views(self, patches: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, C, *spatial) -> (B * S, 3, H, W) views in [0, 1], and S (views per patch)."""
        display = getattr(self.cfg, "view", "array") == "display"
        if patches.ndim == 5 and display:
            v, s = display_slices(patches, self.cfg.axcodes, self.cfg.num_slices)
        elif patches.ndim == 5:
            idx = axial_slice_indices(patches.shape[-1], self.cfg.num_slices)
            v = patches[..., idx]  # B, C, H, W, S
            s = len(idx)
            v = v.permute(0, 4, 1, 2, 3).reshape(-1, *v.shape[1:4])  # B*S, C, H, W
        elif patches.ndim == 4:
            v, s = (patches.transpose(-1, -2) if display else patches), 1  # (x, y) -> rows y, columns x
        else:
            raise VLMError(f"patches must be (B, C, H, W) or (B, C, H, W, D); got shape {tuple(patches.shape)}")
        lo, hi = self.cfg.intensity_window
        v = ((v.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
        c = v.shape[1]
        if c == 1:
            v = v.expand(-1, 3, -1, -1)
        elif c == 2:
            v = torch.cat([v, v.mean(1, keepdim=True)], dim=1)
        else:
            v = v[:, :3]
        return v.contiguous(), s

    @torch.no_grad()
    def encode_images(self, patches: torch.Tensor) -> torch.Tensor:
        v, s = self.views(patches)
        pix = self.image_processor(images=list(v), return_tensors="pt", do_rescale=False)["pixel_values"]
        emb = _features(self.model.get_image_features(pixel_values=pix.to(self.device, torch.float32)))
        emb = F.normalize(emb.float(), dim=-1)
        return emb.view(patches.shape[0], s, -1).mean(1)

    def _encode_text_uncached(self, texts: list[str]) -> torch.Tensor:
        if str(getattr(self.model.config, "model_type", "")).startswith("siglip"):
            # SigLIP was trained on texts padded to its full length (its model card: padding="max_length")
            n = int(self.model.config.text_config.max_position_embeddings)
            tok = self.tokenizer(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
        else:
            # truncated to the text model's positions (CLIP: 77; a longer prompt crashed in the position embedding)
            tc = getattr(self.model.config, "text_config", None)
            n = getattr(tc, "max_position_embeddings", None) or getattr(self.tokenizer, "model_max_length", None)
            kw = {"max_length": int(n)} if n else {}
            tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt", **kw)
        tok = {k: v.to(self.device) for k, v in tok.items()}
        # in fp32 whatever autocast the caller runs under: the cache outlives the call, and a text's embedding must
        # not depend on the precision of the request that first used it (a bf16 request made every later fp32
        # request of that server use bf16-rounded text embeddings)
        with torch.autocast(self.device.type, enabled=False):
            return F.normalize(_features(self.model.get_text_features(**tok)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        found: dict[str, torch.Tensor] = {}
        with self._text_cache_lock:
            for t in dict.fromkeys(texts):
                if t in self._text_cache:
                    self._text_cache.move_to_end(t)
                    found[t] = self._text_cache[t]
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            new = dict(zip(missing, self._encode_text_uncached(list(missing))))
            found.update(new)
            with self._text_cache_lock:
                self._text_cache.update(new)
                while len(self._text_cache) > self.text_cache_size:
                    self._text_cache.popitem(last=False)
        e = torch.stack([found[t] for t in texts])
        if self.text_center is not None:
            e = F.normalize(e - self.text_center.to(e.device), dim=-1)
        return e

    def center_texts_on(self, prompts: Sequence[str]) -> None:
        """A prompted model's text embeddings relative to its prompts' mean, re-normalised (``vlm.center_prompts``).

        CLIP-family text embeddings of related prompts are nearly parallel (the tiny CLIP: cosine 0.96 between
        "the patient's right lung ..." and "... left lung ..."; real CLIPs behave alike for medical prompts), so the
        FiLM heads would see almost the same vector for every label. Centred on the mean of the model's own prompts
        (a fixed vector: the same prompts and VLM give the same centre in training and inference), the labels'
        embeddings point apart; a free prompt is centred on the same vector."""
        self.text_center = None
        self.text_center = self.encode_texts(list(dict.fromkeys(prompts))).mean(0)


def display_slices(patches: torch.Tensor, axcodes: str | None, num_slices: int) -> tuple[torch.Tensor, int]:
    """``(B, C, *3 spatial)`` with axis codes ``axcodes`` (e.g. "RAS") -> ``(B * S, C, rows, columns)`` axial
    slices in the radiological convention: rows from anterior (top) to posterior, columns from the patient's right
    (image left) to the patient's left."""
    codes = (axcodes or "").upper()
    if len(codes) != 3:
        raise VLMError(f"display views of 3D patches need the 3 axis codes of the preprocessing's orientation; "
                       f"got {axcodes!r}")

    def axis(pair: str) -> tuple[int, str]:
        found = [(i, c) for i, c in enumerate(codes) if c in pair]
        if len(found) != 1:
            raise VLMError(f"axis codes {codes!r} do not name one {'/'.join(pair)} axis")
        return found[0]

    (lr, lr_c), (ap, ap_c), (si, _) = axis("LR"), axis("AP"), axis("SI")
    idx = axial_slice_indices(patches.shape[2 + si], num_slices)
    v = patches.index_select(2 + si, torch.as_tensor(idx, device=patches.device))
    v = v.permute(0, 2 + si, 1, 2 + ap, 2 + lr)  # B, S, C, AP, LR
    if ap_c == "A":  # index grows towards anterior: flip so that anterior is row 0
        v = v.flip(-2)
    if lr_c == "R":  # index grows towards the patient's right: flip so that the right is column 0
        v = v.flip(-1)
    return v.reshape(-1, *v.shape[2:]), len(idx)


def patch_texts(items: Sequence[dict], cfg: VLMConfig) -> list[str] | None:
    """The text of every patch's source image, per ``text_mode``; a missing text raises ``VLMError``."""
    if cfg.text_mode == "none":
        return None
    if cfg.text_mode == "label":
        return [cfg.prompt] * len(items)
    texts = []
    for it in items:
        t = it.get("text")
        if not isinstance(t, str) or not t.strip():
            name = it.get("case_id") or it.get("image")
            raise VLMError(f"text_mode='image' but the datalist entry for {name!r} has no 'text'")
        texts.append(t)
    return texts


def patch_condition(vlm: VLMEncoder | None, patches: torch.Tensor, texts: Sequence[str] | None = None,
                    repeats: int = 1) -> torch.Tensor | None:
    """THE conditioning function: a batch of preprocessed patches (+ a text per patch) -> ``(B, embed_dim)``.

    Training calls it on every random patch, the sliding-window inferer on every window. ``repeats``: each patch
    is conditioned on ``repeats`` texts in a row (a prompted model's labels, ``texts`` of length ``B * repeats``);
    its image is embedded once -> ``(B * repeats, embed_dim)``.
    """
    if vlm is None:
        return None
    emb = vlm.encode_images(patches)
    if repeats > 1:
        emb = emb.repeat_interleave(repeats, dim=0)
    if vlm.cfg.text_mode != "none":
        if texts is None or len(texts) != emb.shape[0]:
            raise VLMError(f"text_mode={vlm.cfg.text_mode!r}: need one text per patch "
                           f"({emb.shape[0]}), got {None if texts is None else len(texts)}")
        emb = torch.cat([emb, vlm.encode_texts(list(texts)).to(emb.device)], dim=-1)
    return emb


# -- a tiny CLIP for tests and demos (random weights: it carries no medical knowledge) ---------------------------
def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def ensure_tiny_clip(path: str | Path) -> Path:
    """The benches' tiny CLIP: ``path`` if it already holds one, else written there by :func:`make_tiny_clip`."""
    path = Path(path)
    return path if path.exists() else make_tiny_clip(path)


def legacy_eos_pooling(model, tokenizer) -> str | None:
    """What is wrong when a CLIP text model pools a text at the wrong token: with ``eos_token_id`` 2 in its config,
    transformers' CLIP pools at the highest token id (the end of text in OpenAI's vocabulary, where it is the last
    id); a vocabulary with its end-of-text elsewhere embeds a prompt by its highest-id token, so every prompt whose
    highest-id token is the same gets one embedding ("tumour" and "tumour core in a brain MRI"). The tiny CLIPs made
    here before 2026-12-07 are such. None when the pooling is right."""
    text_cfg = getattr(getattr(model, "config", None), "text_config", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if text_cfg is None or getattr(text_cfg, "eos_token_id", None) != 2 or eos is None:
        return None
    top = max(tokenizer.get_vocab().values())
    if eos == top:
        return None
    return (f"its text model pools each prompt at its highest token id (config eos_token_id 2) but its end of text "
            f"is token {eos}, not the highest ({top}): a prompt is embedded by one of its tokens, and prompts that "
            "share it get one embedding (a tiny CLIP made before 2026-12-07; make it again for prompts embedded "
            "whole)")


def make_tiny_clip(path: str | Path, image_size: int = 32, hidden: int = 32, projection_dim: int = 32,
                   seed: int = 0) -> Path:
    """Write a tiny randomly initialised CLIP (model, image processor, byte-level tokenizer) with save_pretrained.

    It loads through the same ``from_pretrained`` path as a real checkpoint. Random weights: its embeddings are
    fixed random features of the patch, not medical knowledge.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|pad|>": 0, "<|startoftext|>": 1}
    for c in _bytes_to_unicode():
        vocab[c] = len(vocab)
    for c in _bytes_to_unicode():
        vocab[c + "</w>"] = len(vocab)
    # the end of text last, as in OpenAI's vocabulary, and named as such in the config: CLIP pools a text at its end
    # of text (with it at 2, the legacy rule pooled at the highest id, any character: a prompt was embedded by one
    # of its characters; a review, 2026-12-07)
    vocab["<|endoftext|>"] = eos = len(vocab)
    tmp = path / "_vocab"
    tmp.mkdir(exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"), pad_token="<|pad|>",
                        model_max_length=64)  # = max_position_embeddings below
    cfg = CLIPConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=1, eos_token_id=eos,
                         pad_token_id=0),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=max(4, image_size // 8)),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                            crop_size={"height": image_size, "width": image_size}),
                         tokenizer=tok)
    return _save_tiny(model, proc, path, tmp)


def _save_tiny(model, processor, path: Path, scratch: Path) -> Path:
    """``save_pretrained`` of a tiny VLM and its processor; the tokenizer's scratch folder removed."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    return path


def make_tiny_siglip(path: str | Path, image_size: int = 32, hidden: int = 32, seed: int = 0) -> Path:
    """Write a tiny randomly initialised SigLIP (``SiglipModel``, its image processor and a SentencePiece
    ``SiglipTokenizer`` trained here on a few prompts) with save_pretrained: the same ``from_pretrained`` path as
    ``google/siglip-base-patch16-224``. Random weights, like :func:`make_tiny_clip`."""
    import sentencepiece as spm
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "_spm"
    tmp.mkdir(exist_ok=True)
    corpus = ["both lung fields in a chest x-ray", "the patient's right lung", "the patient's left lung",
              "whole tumour with oedema in a brain MRI", "tumour core", "enhancing tumour", "a lesion in a CT scan",
              "a cyst in a CT scan", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,'-"]
    (tmp / "corpus.txt").write_text("\n".join(corpus * 20))
    spm.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "spiece"), vocab_size=128,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2,
                                   hard_vocab_limit=False)
    tok = SiglipTokenizer(vocab_file=str(tmp / "spiece.model"))
    cfg = SiglipConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=16, pad_token_id=0, bos_token_id=None,
                         eos_token_id=1),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=max(4, image_size // 8)),
    )
    torch.manual_seed(seed)
    model = SiglipModel(cfg)
    proc = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size}),
                           tokenizer=tok)
    return _save_tiny(model, proc, path, tmp)
