"""What the OHIF v3 MONAI Label panel shipped with monailabel 0.8.5 (``monailabel/endpoints/static/ohif``, its
``extensions/monai-label`` module) does with ``/info`` and a result, written from that bundle's source so that tests
can check the app against the client users run. ``PANEL_LINES`` are the lines this model follows; a test asserts
they are still in the shipped bundle (a new panel needs a new look)."""

from __future__ import annotations

from pathlib import Path

PANEL_LINES = (
    # MonaiLabelPanel.onInfo: a model's labels (a dict: name -> value; a list: value = position + 1)
    "modelLabelToIdxMap[model][label] = label_idx;",
    # ... and one OHIF segment per label name of /info and of every model, sorted, numbered from 1
    "const labelsOrdered = [...new Set(all_labels)].sort();",
    # MonaiLabelPanel.updateView: each name the request was for is painted with its segment; a name that is not
    # among the model's labels (or whose value is 0) takes its position in that list instead
    "model_seg_idx = model_seg_idx ? model_seg_idx : tmp_model_seg_idx;",
    # PointPrompts.onRunInference, a deepedit model: the points of every label clicked so far, by name
    "params[label] = points[label];",
)


def panel_bundle() -> Path | None:
    """The shipped panel's JavaScript (the bundle that holds ``extensions/monai-label``), or None."""
    import monailabel

    root = Path(monailabel.__file__).parent / "endpoints" / "static" / "ohif"
    for f in sorted(root.glob("*.bundle.*.js")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if "extensions/monai-label/src/components/MonaiLabelPanel.tsx" in text:
            return f
    return None


def segments(info: dict) -> dict[str, int]:
    """OHIF's segment index of every label name (``onInfo``)."""
    names = list(info.get("labels") or [])
    for m in info["models"].values():
        names += list(m["labels"]) if isinstance(m["labels"], (dict, list)) else []
    return {name: i + 1 for i, name in enumerate(sorted(set(names)))}


def model_values(info: dict, model: str) -> dict[str, int]:
    labels = info["models"][model]["labels"]
    return dict(labels) if isinstance(labels, dict) else {name: i + 1 for i, name in enumerate(labels)}


def painted(info: dict, model: str, request_labels: list[str], result_values) -> dict[int, str | None]:
    """For each value of a result, the OHIF segment (name) ``updateView`` paints it with after a request for
    ``request_labels`` (a point prompt: the labels clicked so far, in the order they were first clicked; Run: the
    model's label names, sorted); None: not painted (0)."""
    seg = segments(info)
    values = model_values(info, model)
    mapping, tmp = {0: 0}, 1
    for label in request_labels:
        v = values.get(label) or tmp  # JS: `model_seg_idx ? model_seg_idx : tmp_model_seg_idx`
        mapping[v] = seg[label] & 0xFF
        tmp += 1
    name = {i: n for n, i in seg.items()}
    return {int(v): (name[mapping[v]] if mapping.get(v) else None) for v in result_values}
