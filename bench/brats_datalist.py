"""Write the BraTS datalist the 3D benches use: the first 3 cases train (and validate), the 4th is the test case.

    python bench/brats_datalist.py ../shared/data/brats_wt runs/brats/datalist.json
"""

import json
import sys
from pathlib import Path

root, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
cases = sorted(p for p in root.iterdir() if p.is_dir())


def entry(c):
    return {"image": [str(c / "Flair_subtrMeanDivStd.nii.gz"), str(c / "T1c_subtrMeanDivStd.nii.gz")],
            "label": str(c / "OTMultiClass.nii.gz")}


train = [entry(c) for c in cases[:3]]
out.parent.mkdir(parents=True, exist_ok=True)
json.dump({"training": train, "validation": train, "test": [entry(c) for c in cases[3:]]}, open(out, "w"), indent=1)
print("train:", [c.name for c in cases[:3]], "test:", [c.name for c in cases[3:]])
