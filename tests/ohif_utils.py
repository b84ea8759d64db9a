"""Drive MONAI Label's OHIF page in Debian's headless Chromium with Playwright (no browser download)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--use-gl=angle", "--use-angle=swiftshader",
                 "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


def _viewport_stats(png: Path, box: dict | None) -> dict:
    from PIL import Image

    im = np.asarray(Image.open(png).convert("RGB")).astype(float)
    if box:
        x0, y0 = int(box["x"]), int(box["y"])
        im = im[y0:y0 + int(box["height"]), x0:x0 + int(box["width"])]
    grey = im.mean(-1)
    red = (im[..., 0] > 120) & (im[..., 0] > im[..., 1] + 60) & (im[..., 0] > im[..., 2] + 60)
    return {"std": float(grey.std()), "mean": float(grey.mean()), "red_fraction": float(red.mean())}


def check_ohif(server_url: str, study_uid: str, chromium: str, out_dir: Path, timeout_s: float = 240,
               seg_description: str = "DFM+VLM", segment_label: str = "lesion", max_slices: int = 60) -> dict:
    """Open the study list, then the study in OHIF's segmentation mode; load the stored SEG; screenshots."""
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {"study_listed": False, "image_shown": False, "segment_listed": False, "console_errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: res["console_errors"].append(m.text) if m.type == "error" else None)
            page.set_default_timeout(timeout_s * 1000)
            page.goto(f"{server_url}/ohif/", wait_until="domcontentloaded")
            page.wait_for_selector("text=/Phantom/i", timeout=timeout_s * 1000)
            res["study_listed"] = True
            page.screenshot(path=str(out_dir / "ohif_study_list.png"))

            page.goto(f"{server_url}/ohif/segmentation?StudyInstanceUIDs={study_uid}", wait_until="domcontentloaded")
            page.wait_for_selector("canvas", timeout=timeout_s * 1000)
            deadline = time.time() + timeout_s
            box = None
            while time.time() < deadline:
                time.sleep(3)
                canvases = page.query_selector_all("canvas")
                boxes = [c.bounding_box() for c in canvases if c.bounding_box()]
                box = max(boxes, key=lambda b: b["width"] * b["height"]) if boxes else None
                shot = out_dir / "ohif_viewer.png"
                page.screenshot(path=str(shot))
                stats = _viewport_stats(shot, box)
                res["viewport"] = stats
                if stats["std"] > 10:
                    res["image_shown"] = True
                    break
            try:
                page.locator("button:has-text('Confirm and Hide')").click(timeout=3000)
            except Exception:  # noqa: BLE001 - the investigational-use banner is not always shown
                pass
            # load the SEG: its thumbnail in the study panel (by series description), then the hydration prompt
            seg_thumb = page.locator(f"text={seg_description}").first
            seg_thumb.wait_for(timeout=timeout_s * 1000)
            seg_thumb.dblclick()
            time.sleep(3)
            page.screenshot(path=str(out_dir / "ohif_after_dblclick.png"))
            res["buttons"] = [b.inner_text() for b in page.query_selector_all("button")][:40]
            for label in ("Yes", "Load", "OK"):
                btn = page.locator(f"button:has-text('{label}')").first
                try:
                    btn.click(timeout=10000)
                    break
                except Exception:  # noqa: BLE001 - the prompt differs between OHIF versions
                    continue
            segment = page.get_by_text(segment_label, exact=True).first
            try:
                segment.wait_for(timeout=60000)
                res["segment_listed"] = True
                segment.click()  # OHIF jumps to the slice at the segment's centre
            except Exception:  # noqa: BLE001
                pass
            time.sleep(3)
            # scroll through the slices (mouse wheel over the viewport) until the segment's overlay shows
            shot = out_dir / "ohif_viewer_seg.png"
            if box:
                page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            res["overlay_shown"] = False
            for step in range(max_slices):
                page.screenshot(path=str(shot))
                res["viewport_seg"] = _viewport_stats(shot, box)
                if res["viewport_seg"]["red_fraction"] > 0.001:
                    res["overlay_shown"] = True
                    res["overlay_slice_steps"] = step
                    break
                page.mouse.wheel(0, 120)
                time.sleep(0.7)
            res["page_text"] = page.inner_text("body")[:2000]
        finally:
            browser.close()
    return res
