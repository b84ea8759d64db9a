"""Prompted models: several structures in one model, each chosen by its text prompt.

A preset lists ``structures`` (:class:`lib.config.StructureConfig`): a name, a value in the multi-label map, one or
more prompts and how the structure's binary truth is derived from the label file:

* ``{"values": [1, 3, 4]}``: the label's value is one of these (BraTS tumour core);
* ``{"above": 127}``: the label's value is above this (a 0/255 mask);
* ``+ "side": "low" | "high"`` (and ``"axis"``, default 0): of the two largest connected components of that
  mask, the one whose centre lies lower / higher along that array axis of the label *as loaded*. The chest X-ray
  preset splits the lungs so: MONAI loads a PNG as (x, y), axis 0 runs from the image's left to its right, and in a
  PA (or AP) chest radiograph displayed in the standard way the patient's RIGHT lung is on the image's LEFT: "the
  right lung" (the patient's, as a radiology report says it) is ``side: low``. With a single component (lungs
  touching), that component goes to the side its centre is on; the other side is empty.

**Labels painted in the app** (*Submit Label* from Slicer or OHIF) do not follow those rules: they hold the values
the app paints (``paint``: each structure its ``value``, the most specific over the others), renumbered by the
viewer, which names every value in the request's ``label_info``. The datastore records those names with the label
(``segments``: ``{value: name}``, :func:`lib.datastore.label_segments`) and a training reads such a label by
:func:`painted_values`: a structure's truth is every value named as the structure or as a structure nested in it
(by their dataset rules: the tumour core's values lie inside the whole tumour's ``above 0``; a lung's ``side`` of
the lungs' mask). A structure without a segment of its own is derived where its rule says how (a lung from the
painted lungs) and otherwise left out of training on that label (a channel of NaN), not trained as empty. A label
without names (files put in the studies folder, a client that sent none) keeps the dataset rules.

One function, :func:`structure_truth`, derives a truth: the training preprocessing (before orientation and
spacing, so every structure is resampled the same way), the evaluation labels (original geometry) and the app's
trainer all call it. Training draws one structure per image (:class:`RandStructured`, probability proportional to
``weight``; the patch centres then follow that structure's mask), conditions the patch on ``[image embedding,
prompt embedding]`` and trains the binary DFM on that structure's mask.

Multi-label maps (:func:`paint`): the larger predicted structures are painted first, the smaller over them (whole
tumour, then tumour core, then enhancing tumour; both lungs, then each lung; a vertebra, then a lesion touching
it), so where masks nest or overlap **the most specific structure wins**, whatever the preset's order.
"""

from __future__ import annotations

import json
import logging
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from .config import ConfigError

logger = logging.getLogger(__name__)

TRUTH_KEYS = {"values", "above", "side", "axis"}


class StructureError(ConfigError):
    """A label or prompt request names no structure of the model (the app answers 422)."""


def check_truth(truth: dict, name: str = "") -> None:
    where = f"structure {name!r}: truth" if name else "truth"
    if not isinstance(truth, dict):
        raise ConfigError(f"{where} must be a mapping, got {truth!r}")
    unknown = set(truth) - TRUTH_KEYS
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}; known: {sorted(TRUTH_KEYS)}")
    if ("values" in truth) == ("above" in truth):
        raise ConfigError(f"{where} needs exactly one of 'values' (a list of label values) or 'above' (a threshold)")
    if "values" in truth and (not isinstance(truth["values"], list) or not truth["values"]):
        raise ConfigError(f"{where} 'values' must be a non-empty list, got {truth['values']!r}")
    for v in truth.get("values") or []:
        # labels are loaded as float32 (MONAI's LoadImage), which holds integers exactly only below 2**24: a value
        # 16 777 217 reads as 16 777 216, so its structure's truth was silently empty
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not abs(v) < 2 ** 24:
            raise ConfigError(f"{where} 'values' must be integers of magnitude below 2**24 = 16777216 (labels are "
                              f"read as float32, exact only below that), got {v!r}")
    if truth.get("side") not in (None, "low", "high"):
        raise ConfigError(f"{where} 'side' must be 'low' or 'high', got {truth['side']!r}")
    if "axis" in truth and not isinstance(truth["axis"], int):
        raise ConfigError(f"{where} 'axis' must be an integer, got {truth['axis']!r}")


def _side(mask: np.ndarray, side: str, axis: int) -> np.ndarray:
    """Of the two largest connected components of ``mask`` (spatial array), the lower / higher one along ``axis``."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:2] + 1
    centres = [float(np.nonzero(lab == k)[axis].mean()) for k in keep]
    if len(keep) == 1:  # one component: it goes to the side its centre is on
        low = centres[0] < (mask.shape[axis] - 1) / 2
        return (lab == keep[0]) if (low == (side == "low")) else np.zeros_like(mask)
    order = np.argsort(centres)
    k = keep[order[0] if side == "low" else order[-1]]
    return lab == k


def structure_truth(label, truth: dict) -> np.ndarray:
    """The binary truth ``(1, *spatial)`` (float32 0/1) of one structure from a label map ``(1, *spatial)``."""
    arr = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
    if arr.ndim < 2 or arr.shape[0] != 1:
        raise ValueError(f"a label map must have one channel first, got shape {arr.shape}")
    arr = arr[0]
    if "values" in truth:
        m = np.isin(np.rint(arr).astype(np.int64), [int(v) for v in truth["values"]])
    else:
        m = arr > float(truth["above"])
    if truth.get("side"):
        axis = int(truth.get("axis", 0))
        if not -m.ndim <= axis < m.ndim:
            raise ValueError(f"truth axis {axis} does not exist in a {m.ndim}D label")
        m = _side(m, truth["side"], axis)
    return m[None].astype(np.float32)


NOT_A_STRUCTURE = ("background", "uncertain")  # segment names that are never a structure's truth


def parse_segments(segments) -> dict[int, str]:
    """A painted label's segment names ``{value: name}`` from a datalist item's ``segments`` (a mapping, or its JSON
    text as the app's trainer passes it through a data loader; empty or None: none known). Raises InputError naming
    what is wrong."""
    from .transforms import InputError

    if segments is None or segments == "":
        return {}
    if isinstance(segments, str):
        try:
            segments = json.loads(segments)
        except ValueError as e:
            raise InputError(f"'segments' is not JSON: {e}") from None
    if not isinstance(segments, Mapping):
        raise InputError(f"'segments' must map label values to segment names, got {segments!r}")
    out = {}
    for k, v in segments.items():
        try:
            value = int(str(k))
        except ValueError:
            raise InputError(f"'segments': {k!r} is not a label value (an integer)") from None
        if not isinstance(v, str):
            raise InputError(f"'segments': the name of value {value} must be a string, got {v!r}")
        out[value] = v
    return out


def _base(truth: dict) -> dict:
    return {k: v for k, v in truth.items() if k not in ("side", "axis")}


def inside(inner: dict, outer: dict) -> bool:
    """Whether the mask of dataset rule ``inner`` lies inside that of ``outer`` on every label, by the rules alone."""
    if outer.get("side"):  # one of two components: only the same rule is surely inside it
        return _base(inner) == _base(outer) and inner.get("side") == outer["side"] \
            and int(inner.get("axis", 0)) == int(outer.get("axis", 0))
    inner, outer = _base(inner), _base(outer)  # a side of a mask lies inside the mask
    if "values" in outer:
        return "values" in inner and {int(v) for v in inner["values"]} <= {int(v) for v in outer["values"]}
    t = float(outer["above"])
    return all(float(v) > t for v in inner["values"]) if "values" in inner else float(inner["above"]) >= t


def _key(name: str) -> str:
    return str(name).strip().lower()


def painted_values(structures: Sequence, segments: Mapping[int, str], where: str = "a label") -> list[dict | None]:
    """Per structure, the rule that reads its truth from a painted label (``segments``: ``{value: name}``, names
    matched without regard to case): the values named as the structure or as one nested in it (*Submit Label* of a
    whole tumour painted 1 with the core 2 and the enhancing tumour 3 over it: whole tumour {1, 2, 3}, core {2, 3},
    enhancing {3}). A structure without a segment of its own is derived where its dataset rule says how (a lung:
    its ``side`` of the painted lungs) and otherwise unknown (None: not trained on this label, not scored; it is
    not empty -- the annotator painted only the whole tumour). When no segment names a structure of the model, every
    structure is unknown (with a warning; the app's trainer leaves such a label out)."""
    names = {_key(s.name): s.name for s in structures}
    named = {names[_key(n)] for n in segments.values() if _key(n) in names}
    if not named:  # painted values read by the dataset's codes would be wrong truths (value 1 read as a BraTS core)
        logger.warning("%s: its segments %s name no structure of this model (%s): not trained", where,
                       dict(segments), sorted(names.values()))
        return [None] * len(structures)
    other = sorted({n for n in segments.values() if _key(n) not in names and _key(n) not in NOT_A_STRUCTURE})
    if other:
        logger.warning("%s: segment(s) %s are no structure of this model (%s): not trained", where, other,
                       sorted(names.values()))

    def values_of(s) -> list[int]:
        nested = {o.name for o in structures if inside(o.truth, s.truth)}
        return sorted(v for v, n in segments.items() if names.get(_key(n)) in nested)

    out = []
    for s in structures:
        if s.name in named:
            out.append({"values": values_of(s)})
            continue
        side = s.truth.get("side")
        outer = [o for o in structures if side and o.name in named and not o.truth.get("side")
                 and _base(o.truth) == _base(s.truth)]
        out.append({"values": values_of(outer[0]), "side": side, "axis": int(s.truth.get("axis", 0))}
                   if outer else None)
    unknown = [s.name for s, r in zip(structures, out) if r is None]
    if unknown:
        logger.info("%s: no segment for %s: not trained on this label", where, unknown)
    return out


def painted_foreground(segments: Mapping[int, str], name: str | None = None) -> tuple[list[int], bool]:
    """A one-structure model's painted label: ``(values, only)``. When a segment is named as the model's structure
    (``name``, without regard to case), its foreground is the values named so and nothing else (``only``: a helper
    segment an annotator added, "heart" beside "lung", was trained as lung; :class:`lib.transforms.BinarizeLabeld`
    falls back to the rule below where those values are not in the file); otherwise every non-zero value but
    those named ``background`` or ``uncertain`` (``values``, ``only`` False: as ``label > 0``, whatever the
    dataset's threshold, e.g. Slicer's "Segment_1")."""
    if name is not None and any(_key(n) == _key(name) for n in segments.values()):
        return sorted(v for v, n in segments.items() if _key(n) == _key(name)), True
    return sorted(v for v, n in segments.items() if _key(n) in NOT_A_STRUCTURE), False


class StructureTruthd(MapTransform):
    """A label map -> one binary channel per structure (the preset's order), each by :func:`structure_truth`."""

    def __init__(self, keys: KeysCollection, structures: Sequence, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.structures = list(structures)

    def __call__(self, data):
        from .transforms import TRUTH_NOTE, _name, mark_unread, one_channel_label, unread_label_note

        d = dict(data)
        segments = parse_segments(d.pop("segments", None))
        for key in self.key_iterator(d):
            lab = one_channel_label(d, key)
            painted = painted_values(self.structures, segments, _name(d, key)) if segments else None
            if painted is None:
                chans = [structure_truth(lab, s.truth) for s in self.structures]
            else:  # an unknown structure: a channel of NaN (RandStructured does not draw it, evaluate skips it)
                chans = [structure_truth(lab, r) if r else np.full((1, *lab.shape[1:]), np.nan, np.float32)
                         for r in painted]
            if isinstance(lab, torch.Tensor):  # (lab * 0 + truth): a MetaTensor keeps the label's geometry
                d[key] = torch.cat([lab.float() * 0 + torch.as_tensor(c, device=lab.device) for c in chans])
            else:
                d[key] = np.concatenate(chans)
            note = None if painted is not None else unread_label_note(
                lab, d[key], "no structure's truth takes them (" + "; ".join(
                    f"{s.name}: " + (f"values {list(s.truth['values'])}" if "values" in s.truth
                                     else f"above {s.truth['above']:g}") for s in self.structures) + ")")
            if note and hasattr(d[key], "meta"):
                d[key].meta[TRUTH_NOTE] = note
            elif not note and painted is None:
                mark_unread(lab, d[key])
        return d


class RandStructured(Randomizable, MapTransform):
    """Draw one structure per image (probability proportional to ``weight``): ``label`` becomes its channel, and
    ``text`` one of its prompts (drawn), ``structure`` its name. Seeded with the other random transforms."""

    def __init__(self, structures: Sequence, label_key: str = "label"):
        MapTransform.__init__(self, [label_key])
        self.structures = list(structures)
        w = np.array([s.weight for s in self.structures], dtype=float)
        self.p = w / w.sum()
        self.label_key = label_key
        self._s = self._prompt = 0

    def randomize(self, data=None, known: Sequence[int] | None = None) -> None:
        if known is None or len(known) == len(self.structures):
            self._s = int(self.R.choice(len(self.structures), p=self.p))
        else:  # a painted label without some structures' segments: only those it has
            p = self.p[list(known)]
            self._s = int(known[int(self.R.choice(len(known), p=p / p.sum()))])
        self._prompt = int(self.R.randint(len(self.structures[self._s].prompts)))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]):
        d = dict(data)
        lab = d[self.label_key]
        if lab.shape[0] != len(self.structures):
            raise ValueError(f"the label has {lab.shape[0]} channel(s), the model {len(self.structures)} structures")
        known = [i for i in range(lab.shape[0]) if not bool(torch.isnan(torch.as_tensor(lab[i])).any())]
        if not known:
            raise ValueError("the label has no structure to train on (every channel unknown)")
        self.randomize(known=known)
        s = self.structures[self._s]
        d[self.label_key] = lab[self._s:self._s + 1]
        d["text"] = s.prompts[self._prompt]
        d["structure"] = s.name
        return d


def select(structures: Sequence, labels: Sequence[str] | str | None = None) -> list:
    """The structures a request names (comma-separated or a list, by name or by value as VISTA3D's class prompts;
    None / empty / "all": every one), in the model's painting order."""
    if labels is None:
        return list(structures)
    if isinstance(labels, (str, int)):
        labels = [x.strip() for x in str(labels).split(",") if x.strip()]
    else:
        labels = [str(x).strip() for x in labels if str(x).strip()]
    if not labels or [x.lower() for x in labels] == ["all"]:  # [], ",", " ", "ALL": every one (was: none, a 500)
        return list(structures)
    names = [s.name for s in structures]
    by_value = {str(s.value): s.name for s in structures}
    # a value names it too, and a name in another case (names are unique in any case: "Vertebra" was refused while
    # a painted segment "Lesion" trained as lesion; a review)
    by_lower = {n.lower(): n for n in names}
    labels = [str(x) if str(x) in names else by_value.get(str(x), by_lower.get(str(x).lower(), str(x)))
              for x in labels]
    unknown = [x for x in labels if x not in names]
    if unknown:
        raise StructureError(f"label(s) {unknown} are not structures of this model; it segments {names}")
    want = set(labels)
    return [s for s in structures if s.name in want]


def paint(probs: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """``probs (L, *spatial)`` -> one uint8 label map: each ``> 0.5`` painted with its value, the larger predicted
    structures first and the smaller over them, so where masks nest or overlap the most specific (smallest) one
    wins -- a tumour core inside the whole tumour, a lesion touching a vertebra -- whatever order the preset lists
    them in (equal sizes: the model's order, the later over the earlier)."""
    masks = [torch.as_tensor(p) > 0.5 for p in probs]
    order = sorted(range(len(masks)), key=lambda i: (-int(masks[i].sum()), i))
    out = torch.zeros(probs.shape[1:], dtype=torch.uint8)
    for i in order:
        out[masks[i]] = int(values[i])
    return out
