"""A real Orthanc (Debian packages orthanc, orthanc-dicomweb, orthanc-gdcm) on 127.0.0.1 with its own storage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import requests

from server_utils import free_port, stop_process_group, wait_until_answering

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else the reason to skip."""
    if not os.path.exists(ORTHANC):
        return "Orthanc is not installed (Debian package orthanc; .ci/run installs it)"
    if not (PLUGINS / "libOrthancDicomWeb.so").exists():
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return None


class Orthanc:
    def __init__(self, workdir: Path, timeout: float = 60):
        self.port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        workdir.mkdir(parents=True, exist_ok=True)
        plugins = [str(PLUGINS / p) for p in ("libOrthancDicomWeb.so", "libOrthancGdcm.so") if (PLUGINS / p).exists()]
        cfg = {
            "Name": "dfm-vlm-test-pacs",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": self.port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": False,
            "Plugins": plugins,
            "StableAge": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps(cfg, indent=1))
        self.log = open(workdir / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until_answering(self.proc, f"{self.url}/system", timeout, self.stop,
                             lambda: f"Orthanc exited: {(workdir / 'orthanc.log').read_text()[-3000:]}",
                             lambda: "Orthanc did not start")

    def upload(self, path: Path) -> dict:
        r = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(),
                          headers={"Content-Type": "application/dicom"}, timeout=60)
        r.raise_for_status()
        return r.json()

    def upload_folder(self, folder: Path) -> set[str]:
        """Upload every file of a folder; returns the Orthanc series ids."""
        return {self.upload(p)["ParentSeries"] for p in sorted(Path(folder).iterdir()) if p.is_file()}

    def series(self) -> list[dict]:
        return [requests.get(f"{self.url}/series/{s}", timeout=30).json()
                for s in requests.get(f"{self.url}/series", timeout=30).json()]

    def instance_hashes(self) -> dict[str, str]:
        """SOPInstanceUID -> MD5 of the stored file, to show that nothing stored was lost or altered."""
        out = {}
        for i in requests.get(f"{self.url}/instances", timeout=60).json():
            meta = requests.get(f"{self.url}/instances/{i}/metadata?expand", timeout=30).json()
            tags = requests.get(f"{self.url}/instances/{i}/simplified-tags", timeout=30).json()
            out[tags["SOPInstanceUID"]] = meta.get("TransferSyntax", "") + ":" + \
                requests.get(f"{self.url}/instances/{i}/attachments/dicom/md5", timeout=30).text
        return out

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.log.close()
