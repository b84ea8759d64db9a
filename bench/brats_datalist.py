"""Write the BraTS datalist the 3D benches use: the first 3 cases train (and validate), the 4th is the test case.

    python bench/brats_datalist.py ../shared/data/brats_wt runs/brats/datalist.json
"""

import argparse
import json
import sys
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("root", help="the BraTS folder (../shared/data/brats_wt)")
ap.add_argument("out", help="the datalist to write")
a = ap.parse_args()
root, out = Path(a.root).resolve(), Path(a.out)
cases = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
if len(cases) < 2:  # (a traceback before; the 3D benches need the shared data)
    sys.exit(f"error: {root} holds {len(cases)} BraTS case folder(s); the 3D benches need ../shared/data/brats_wt")


def entry(c):
    return {"image": [str(c / "Flair_subtrMeanDivStd.nii.gz"), str(c / "T1c_subtrMeanDivStd.nii.gz")],
            "label": str(c / "OTMultiClass.nii.gz")}


train = [entry(c) for c in cases[:3]]
out.parent.mkdir(parents=True, exist_ok=True)
json.dump({"training": train, "validation": train, "test": [entry(c) for c in cases[3:]]}, open(out, "w"), indent=1)
print("train:", [c.name for c in cases[:3]], "test:", [c.name for c in cases[3:]])
