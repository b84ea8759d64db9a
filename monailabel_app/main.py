"""MONAI Label app serving the DFM+VLM models (3D Slicer's MONAILabel module, OHIF, the REST API).

    python -m monailabel.main start_server --app monailabel_app --studies sample_data --host 127.0.0.1 --port 8000

Models are the task configs in ``lib/configs`` (``--conf models dfm_vlm_3d,dfm_vlm_2d``; default: all). Strategies:
``random``, ``first`` and ``<model>_uncertainty``; scoring methods: ``<model>_uncertainty``. See the README for the
conf keys and request parameters.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# DDP workers (torch.multiprocessing.spawn) and MONAI Label's task subprocesses import ``lib`` too.
if ROOT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)

from lib.lifetime import SERVER_PID, end_with_the_server  # noqa: E402

end_with_the_server()  # in a task process the server started: before the imports below (seconds)

# MONAI Label downloads dcmqi at start unless itkimage2segimage is on PATH; the pip package dcmqi puts it beside
# this interpreter (a venv's bin/), which is not on PATH when the venv's python is run without activation.
_bin = os.path.dirname(sys.executable)
if os.path.exists(os.path.join(_bin, "itkimage2segimage")) and _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

from fastapi import HTTPException  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.config import TaskConfig  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from lib.activelearning.fair_random import FairRandom  # noqa: E402

import lib  # noqa: E402
import lib.configs  # noqa: E402
from lib.checkpoint import CheckpointError  # noqa: E402
from lib.clicks import ClickError, check_no_stray_points  # noqa: E402
from lib.config import ConfigError  # noqa: E402
from lib.datastore import check_name  # noqa: E402
from lib.inferer import NonFiniteOutput  # noqa: E402
from lib.infers.dfm_vlm import ModelNotReady, _as_bool  # noqa: E402
from lib.threads import DATASTORE_WRITES, in_a_passing_thread, one_cpu_thread_here  # noqa: E402
from lib.transforms import InputError  # noqa: E402
from lib.vlm import VLMError  # noqa: E402

logger = logging.getLogger(__name__)


TRAIN_INTS = ("max_epochs", "train_batch_size", "val_batch_size", "patches_per_image", "early_stop_patience")
TRAIN_BOOLS = ("pretrained", "multi_gpu", "augment")


def check_train_request(app, model: str, params: dict | None) -> dict | None:
    """``POST /train/<model>``: MONAI Label starts the training in a background process before anything is checked,
    so an unknown model or ``learning_rate=abc`` came back as a task that ended in ERROR (or, with ``run_sync``, a
    500). Checked here first, with the infer task's request parsers: 404 for an unknown model, 422 naming a
    parameter that is not what the trainer reads. Returns the parameters as the trainer reads them: numbers and
    booleans sent as strings (``"max_epochs": "1"``, ``"pretrained": "false"``) parsed (forwarded raw, ``"1"``
    passed the check and then failed the task, ``"false"`` was true), ``name`` a plain name (it names the output
    folder under ``model_dir``)."""
    import math

    from lib.infers.dfm_vlm import _as_float, _as_int

    trainers = getattr(app, "_trainers", {}) or {}
    if model and model not in trainers:
        raise HTTPException(status_code=404, detail=f"unknown model {model!r} to train; available: {sorted(trainers)}")
    p = params or {}
    if not isinstance(p, dict):
        raise HTTPException(status_code=422, detail=f"training parameters must be a JSON object, got {p!r}")
    out = dict(p)
    try:
        for k in TRAIN_INTS:
            if k in p:
                out[k] = _as_int(k, p[k])
                if out[k] < 1 and not (k == "early_stop_patience" and out[k] >= -1):
                    # MONAI Label's own default patience is -1 (off; <= 0 is off), and 3D Slicer's Train sends
                    # every option of /info: -1 was refused, so Train with the default options never started
                    raise ConfigError(f"parameter {k!r} must be an integer >= 1"
                                      f"{' (or -1 / 0: off)' if k == 'early_stop_patience' else ''}, got {p[k]!r}")
        for k in ("learning_rate", "fine_tune_lr_scale"):
            if k in p:
                out[k] = _as_float(k, p[k])
                if not 0 < out[k] < math.inf:
                    raise ConfigError(f"parameter {k!r} must be > 0, got {p[k]!r}")
        if "val_split" in p:
            out["val_split"] = _as_float("val_split", p["val_split"])
            if not 0 <= out["val_split"] < 1:
                raise ConfigError(f"parameter 'val_split' must be in [0, 1), got {p['val_split']!r}")
        for k in TRAIN_BOOLS:
            if k in p:
                out[k] = _as_bool(k, p[k])
    except ConfigError as e:
        raise HTTPException(status_code=422, detail=f"training: {e}") from None
    if "name" in p:
        check_name(p["name"], "training parameter 'name'")
    if "lr_schedule" in p:
        from lib.trainers.dfm_vlm import LR_SCHEDULES

        if str(p["lr_schedule"]).lower() not in LR_SCHEDULES:
            raise HTTPException(status_code=422, detail=f"training: parameter 'lr_schedule' must be one of "
                                                        f"{list(LR_SCHEDULES)}, got {p['lr_schedule']!r}")
        out["lr_schedule"] = str(p["lr_schedule"]).lower()
    if "publish" in p and str(p["publish"]).lower() not in ("better", "always"):
        raise HTTPException(status_code=422, detail=f"training: parameter 'publish' must be 'better' (the default: "
                                                    f"only a model that beats the served one) or 'always', got "
                                                    f"{p['publish']!r}")
    return out if params is not None else None


def check_task_request(app, method: str, request: dict | None, params: dict | None) -> dict | None:
    """The one check before MONAI Label starts a background task (``AsyncTask.run``: training, scoring, batch
    inference). MONAI Label starts the subprocess first and checks nothing, so ``POST /scoring/<unknown>``,
    ``/batch/infer/<unknown>`` and ``POST /train/`` (every model) answered 200 and the task ended in ERROR; and the
    task's request is the path's model or method *updated by the parameters*, so ``params.model`` replaced the checked
    one. Here: 404 for an unknown model or method, 422 for a parameter naming another one than the path, the
    training parameters through :func:`check_train_request`. Returns the parameters to start the task with."""
    request = request or {}
    key = "method" if method == "scoring" else "model"
    given = request.get(key)
    if isinstance(params, dict) and key in params and given is not None and params[key] != given:
        raise HTTPException(status_code=422, detail=f"parameter {key!r} = {params[key]!r} differs from the {key} "
                                                    f"{given!r} of the request path")
    if method == "train":
        # POST /train/ (every model) merges params[<model>] into each model's request and passes the whole params on:
        # those per-model values are checked too, and the request gets them parsed (the task reads the request)
        trainers = getattr(app, "_trainers", {}) or {}
        own = {k: v for k, v in request.items() if k != "model"}
        if own:
            request.update(check_train_request(app, given, own))
        if params is None:
            return check_train_request(app, given, None)
        # every model's own parameters, at the first model's call: POST /train/ starts the models one by one, and a
        # bad value for the second must not leave the first one training
        per_model = {k: v for k, v in params.items() if k in trainers and isinstance(v, dict)}
        for name, p in per_model.items():
            check_train_request(app, name, p)
        flat = check_train_request(app, given, {k: v for k, v in params.items() if k not in per_model})
        return {**flat, **per_model}
    if method == "scoring" and given is not None and given not in (getattr(app, "_scoring_methods", {}) or {}):
        raise HTTPException(status_code=404, detail=f"unknown scoring method {given!r}; available: "
                                                    f"{sorted(getattr(app, '_scoring_methods', {}) or {})}")
    if method == "scoring" and params is not None:
        # the scoring answered 200 with {"error": ...} (or a task that ended DONE with it) for num_samples 1 or
        # "abc", and ran on its own device whatever "device" said
        from lib.activelearning.uncertainty import check_num_samples
        from lib.infers.dfm_vlm import request_device

        if not isinstance(params, dict):
            raise HTTPException(status_code=422, detail=f"scoring parameters must be a JSON object, got {params!r}")
        methods = getattr(app, "_scoring_methods", {}) or {}
        # POST /scoring/ (every method) passes each method's own parameters under its name
        for where, p in [("scoring", params)] + [(f"scoring {k}", v) for k, v in params.items()
                                                  if k in methods and isinstance(v, dict)]:
            try:
                if p.get("num_samples") is not None:
                    check_num_samples(p["num_samples"])
                if p.get("device") is not None:
                    request_device(p["device"], "cpu")
            except ConfigError as e:
                raise HTTPException(status_code=422, detail=f"{where}: {e}") from None
            # scores rank images only when made alike: by the served checkpoint's own sampler (a review: steps,
            # sampler, seed, precision or overlap were accepted and ignored, the answer saying nothing)
            ignored = sorted(k for k in SCORING_FIXED_KEYS if k in p)
            if ignored:
                raise HTTPException(status_code=422, detail=f"{where}: {ignored} cannot be set for scoring: every "
                                                            "image is scored with the served checkpoint's own sampler "
                                                            "settings, so that its scores compare; only num_samples "
                                                            "and device may be given")
    if method == "batch_infer" and given not in (getattr(app, "_infers", {}) or {}):
        raise HTTPException(status_code=404, detail=f"unknown model {given!r}; available: "
                                                    f"{sorted(getattr(app, '_infers', {}) or {})}")
    return params


SCORING_FIXED_KEYS = ("sampler", "steps", "overlap", "sw_batch_size", "seed", "precision", "roi_size",
                      "max_batch_voxels")


def _install_request_checks() -> None:
    """Wrap MONAI Label's ``AsyncTask.run`` (every endpoint that starts training, scoring or batch inference calls it)
    with :func:`check_task_request`."""
    from monailabel.interfaces.utils.app import app_instance
    from monailabel.utils.async_tasks.task import AsyncTask

    if getattr(AsyncTask.run, "_dfm_checked", False):
        return
    original = AsyncTask.run

    def run(method, request=None, params=None, force_sync=False, enqueue=False):
        params = check_task_request(app_instance(), method, request, params)
        return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    run._dfm_checked = True
    AsyncTask.run = staticmethod(run)


def opened_file_response(path, media_type=None, filename=None, **kwargs):
    """A datastore file's download, sent from the file it opened: MONAI Label's ``FileResponse`` took the size from
    ``stat`` and opened the file again by its name later, so a label saved meanwhile (an atomic replace) was sent cut
    short or overlong ("Too much data for declared Content-Length"; a review, 2026-12-07). Starlette's
    ``FileResponse`` of ``/proc/self/fd/N`` (the open file, whatever is renamed over its name or removed), with that
    file's own ``stat``: ranges, ETag and Last-Modified as before. The descriptor is closed once the answer is sent
    or dropped."""
    import weakref

    from starlette.background import BackgroundTask
    from starlette.responses import FileResponse

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise HTTPException(status_code=404, detail=f"{os.path.basename(path)} was removed meanwhile") from None
    opened = f"/proc/self/fd/{fd}"
    if not os.path.exists(opened):  # (no /proc: by its name, as MONAI Label did)
        os.close(fd)
        return FileResponse(path, media_type=media_type, filename=filename, **kwargs)
    response = FileResponse(opened, media_type=media_type, filename=filename, stat_result=os.fstat(fd), **kwargs)
    close = weakref.finalize(response, os.close, fd)  # (once: when sent, or when the answer is dropped)
    given = response.background

    async def after():
        close()
        if given is not None:
            await given()

    response.background = BackgroundTask(after)
    response.source = path  # (its name: the dataset's zip is removed once sent; .path is the open file's)
    return response


def _install_consistent_downloads() -> None:
    """``GET /datastore/image`` and ``/datastore/label`` send the file they opened (:func:`opened_file_response`)."""
    import monailabel.endpoints.datastore as endpoint

    endpoint.FileResponse = opened_file_response


def _install_model_file_checks() -> None:
    """``PUT /model/<model>`` copied any upload over the file the model serves -- before a training here, the
    configured checkpoint (with the README's command, the repository's sample model) -- and ``DELETE /model/<model>``
    renamed that file away: one request from an annotator's role left the model unservable (a review: 170 bytes of
    garbage answered 200; a 3D checkpoint uploaded for the 2D model was served). Here an upload must load as this
    model's checkpoint (its VLM, dimension and labels), else 422 and nothing written; it becomes the *published*
    checkpoint (where a training publishes; the one it replaces is kept beside it as ``<name>.pt.<time>.replaced``),
    written atomically; ``DELETE`` removes only a published checkpoint (renamed ``.deleted``, as MONAI Label does),
    so the configured one is served again, and refuses (409) to touch the configured one."""
    import monailabel.endpoints.model as endpoint

    if getattr(endpoint.update_model, "_dfm_checked", False):
        return

    def _same_file(a: str, b: str) -> bool:
        try:
            return os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b)
        except OSError:
            return False

    def task_of(model: str):
        from monailabel.interfaces.utils.app import app_instance

        task = (getattr(app_instance(), "_infers", {}) or {}).get(model)
        if task is None or not hasattr(task, "get_path"):
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}")
        return task

    def update_model(background_tasks, model: str, file):
        import secrets
        import shutil

        from monailabel.utils.others.generic import file_checksum

        from lib.checkpoint import atomic_write, keep_replaced_copy, load_system

        task = task_of(model)
        published = task.path[-1]
        if _same_file(published, task.path[0]):
            # --conf model_dir holding the configured checkpoint, or <model>_checkpoint naming the published file
            raise HTTPException(status_code=409, detail=f"model {model}: its published checkpoint is its configured "
                                                        f"one ({published}), which is not replaced through the API")
        folder = os.path.dirname(published) or "."
        os.makedirs(folder, exist_ok=True)
        # loaded from the folder it will be served from: a VLM it names relative to itself must be found there
        upload = os.path.join(folder, f".{os.path.basename(published)}.upload-{secrets.token_hex(4)}")
        try:
            with open(upload, "wb") as f:
                shutil.copyfileobj(file.file, f)
            try:
                system = load_system(upload, vlm=getattr(task, "vlm", None),
                                     vlm_candidates=getattr(task, "vlm_candidates", ()))
            except Exception as e:  # noqa: BLE001 - whatever fails to load (hyper_parameters a string: a TypeError)
                hint = ""
                if "was not found" in str(e):  # the served file itself, uploaded again (a review): its VLM is named
                    hint = (f" (an uploaded checkpoint is served from {folder}: it must name its VLM by an absolute "
                            "path or a hub id, have it beside it there, or have been trained with a VLM this server "
                            "serves (the same fingerprint); python -m lib upgrade-checkpoint FILE --out NEW --vlm "
                            "FOLDER writes such a copy)")
                raise HTTPException(status_code=422, detail=f"model {model}: the upload is not a checkpoint this "
                                                            f"model can serve: {e}{hint}; nothing was written") \
                    from None
            want = {k: v for k, v in (task.labels if isinstance(task.labels, dict) else {}).items()
                    if k not in ("uncertain", "background")}
            got_dims = system.hparams.preprocessing.spatial_dims
            if got_dims != task.dimension or (want and system.hparams.label_map != want):
                raise HTTPException(status_code=422, detail=f"model {model}: the upload is a {got_dims}D model of "
                                                            f"{system.hparams.label_map}, this model is "
                                                            f"{task.dimension}D with {want} (its /info labels); "
                                                            "nothing was written")
            del system
            if os.path.exists(published):
                keep_replaced_copy(published)
            with open(upload, "rb") as src:
                atomic_write(published, lambda f: shutil.copyfileobj(src, f))
        finally:
            if os.path.exists(upload):
                os.unlink(upload)
        s = os.stat(published)
        return {"checksum": file_checksum(published), "modified_time": int(s.st_mtime), "path": published}

    def delete_model(model: str):
        import datetime
        import shutil

        task = task_of(model)
        published, served = task.path[-1], task.get_path()
        if not served or served != published or _same_file(published, task.path[0]):
            raise HTTPException(status_code=409, detail=f"model {model}: it serves {served}, the configured "
                                                        "checkpoint, which is not deleted through the API (only a "
                                                        "checkpoint published here, by a training or an upload, is)")
        shutil.move(published, f"{published}.{datetime.datetime.now().strftime('%Y%m%d_%H%M%S')}.deleted")
        return {"deleted": published, "serving": task.get_path()}

    update_model._dfm_checked = True
    endpoint.update_model = update_model
    endpoint.delete_model = delete_model


MAX_ARCHIVE_BYTES = int(os.environ.get("DFM_MAX_ARCHIVE_BYTES", 2 ** 31))  # a session archive, unpacked (2 GiB)
MAX_ARCHIVE_MEMBERS = 20000


def unpack_archive_checked(path: str, dest: str) -> None:
    """A session archive (``PUT /session?uncompress=true``), checked and unpacked **by the reader that checked
    it** into ``dest``: only plain files and folders, no entry outside ``dest``, at most :data:`MAX_ARCHIVE_BYTES`
    unpacked (``DFM_MAX_ARCHIVE_BYTES``) and :data:`MAX_ARCHIVE_MEMBERS` entries. MONAI Label
    ``shutil.unpack_archive``d it unfiltered: a tar member ``../../x`` was written outside the session folder (as
    root: anywhere) and a link member pointed at /etc (a review); and a check by content followed by an unpack by
    file name let a tar with a small zip appended pass as the zip (a second review). A tar is unpacked with
    tarfile's ``data`` filter as well."""
    import tarfile
    import zipfile

    def bad(why):
        return HTTPException(status_code=422, detail=f"the session archive is refused: {why}")

    def check_name_in(name: str):
        parts = name.replace("\\", "/").split("/")
        if "\x00" in name or name.startswith("/") or ".." in parts or (len(parts[0]) == 2 and parts[0][1] == ":"):
            raise bad(f"the entry {name[:80]!r} points outside the folder it unpacks to")

    def check_size(total: int):
        if total > MAX_ARCHIVE_BYTES:
            raise bad(f"it unpacks to {total:,} bytes, more than this server's limit of {MAX_ARCHIVE_BYTES:,} "
                      "(DFM_MAX_ARCHIVE_BYTES)")

    if tarfile.is_tarfile(path):
        try:
            with tarfile.open(path) as t:  # any compression tarfile reads
                members = []
                for m in t:
                    members.append(m)
                    if len(members) > MAX_ARCHIVE_MEMBERS:
                        raise bad(f"more than {MAX_ARCHIVE_MEMBERS} entries")
                    check_name_in(m.name)
                    if not (m.isfile() or m.isdir()):
                        raise bad(f"the entry {m.name[:80]!r} is a link or a device, not a file")
                check_size(sum(m.size for m in members))
                t.extractall(dest, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise bad(f"it cannot be unpacked as a tar archive ({type(e).__name__}: {e})") from None
    elif zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
                if len(infos) > MAX_ARCHIVE_MEMBERS:
                    raise bad(f"{len(infos)} entries, more than {MAX_ARCHIVE_MEMBERS}")
                for i in infos:
                    check_name_in(i.filename)
                    if (i.external_attr >> 16) & 0o170000 == 0o120000:
                        raise bad(f"the entry {i.filename[:80]!r} is a link")
                check_size(sum(i.file_size for i in infos))
                z.extractall(dest)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise bad(f"it cannot be unpacked as a zip archive ({type(e).__name__}: {e})") from None
    else:
        raise bad("it is neither a zip nor a tar archive")


def _install_session_checks() -> None:
    """``PUT /session``: MONAI Label's ``create_session`` with the upload's names checked (a file named ``..`` or
    ``/`` was a 500 that left a folder behind), an archive checked and unpacked by the app (:func:`unpack_archive_checked`),
    and the received files removed when the session is refused (they stayed in the temporary folder)."""
    import monailabel.endpoints.session as endpoint

    if getattr(endpoint.create_session, "_dfm_checked", False):
        return

    def create_session(background_tasks, uncompress: bool = False, expiry: int = 0, files=None):
        import shutil
        import tempfile

        from monailabel.interfaces.utils.app import app_instance

        sessions = app_instance().sessions()
        if sessions is None:
            raise HTTPException(status_code=406, detail="Session Feature is Not Enabled")
        files = list(files or [])
        if not files:
            raise HTTPException(status_code=422, detail="no file was sent")
        names = []
        for f in files:
            check_upload_name("file", f.filename)
            name = os.path.basename(str(f.filename or "").replace("\\", "/"))
            if f.filename and name in ("", ".", ".."):
                raise HTTPException(status_code=422, detail=f"the uploaded file's name {f.filename[:80]!r} is not a "
                                                            "file name")
            names.append(name or "image.nii.gz")
        if len(set(names)) < len(names):
            raise HTTPException(status_code=422, detail=f"two uploaded files share a name: {names}")
        if uncompress and len(files) != 1:
            raise HTTPException(status_code=422, detail="'uncompress' takes one archive; send the files themselves "
                                                        "without it")
        received = tempfile.mkdtemp()
        try:
            for f, name in zip(files, names):
                with open(os.path.join(received, name), "wb") as out:
                    shutil.copyfileobj(f.file, out)
            data = received if len(files) > 1 else os.path.join(received, names[0])
            if uncompress:  # unpacked here, checked, into a folder MONAI Label stores as the session's image
                unpacked = tempfile.mkdtemp(dir=received)  # (a new tmpXXXXXXXX name, as MONAI Label's)
                unpack_archive_checked(data, unpacked)
                data = unpacked
            session_id, info = sessions.add_session(data, expiry, False)
        finally:
            shutil.rmtree(received, ignore_errors=True)
        return {"session_id": session_id, "session_info": info.to_json()}

    create_session._dfm_checked = True
    endpoint.create_session = create_session


_RESULT = threading.local()  # this thread's last /infer result's label names (for its DICOM SEG, below)


_INPUTS = threading.local()  # whether the /infer request being checked uploaded its image or named a session
MAX_UPLOAD_NAME = 200  # an upload's file name: MONAI Label stores it under a temporary name with the name's suffixes


def check_upload_name(key: str, filename) -> None:
    """An uploaded file's name (MONAI Label keeps its suffixes for the temporary copy): NUL or a suffix of hundreds
    of characters made ``tempfile`` raise, a bare 500 (a review)."""
    if not isinstance(filename, str):
        return
    # bytes, as the file system counts them (a review: 159 characters of "é" are 309 bytes, and a 500 again)
    if "\x00" in filename or len(os.path.basename(filename).encode("utf-8", "surrogatepass")) > MAX_UPLOAD_NAME:
        raise HTTPException(status_code=422, detail=f"the uploaded {key}'s file name {filename[:80]!r} has a NUL "
                                                    f"character or more than {MAX_UPLOAD_NAME} bytes in UTF-8")


def upload_image_id(filename: str) -> str:
    """The image id of ``PUT /datastore/image`` without ``image``: the file's name without its image suffix (the
    longest known one, else its last). MONAI Label cut the name at its first dot, so "case.001.nii.gz" and
    "case.002.nii.gz" both became "case", the second replacing the first without a word, and "CT 2024.01.05.nii.gz"
    became "CT 2024" (a review)."""
    from lib.data import strip_image_suffix

    base = os.path.basename(filename)
    stem = strip_image_suffix(base)
    return stem if stem != base else os.path.splitext(base)[0] or base


def check_json_field(name: str, text) -> None:
    """A client's JSON form field (``params`` of ``/infer`` and of the datastore's uploads, ``info`` of the info
    updates), as MONAI Label's endpoint will parse it: not JSON, or JSON that is not an object, is a 422 naming the
    field and where the text breaks (MONAI Label ``json.loads`` it and merges it into its request: a bare 500)."""
    import json

    if text in (None, ""):  # the endpoint reads "nothing" as {}
        return
    if not isinstance(text, (str, bytes, bytearray)):
        return  # FastAPI's Form(...) default when called directly; the endpoint itself handles it
    try:
        value = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError; a UnicodeDecodeError of bytes is a ValueError too
        raise HTTPException(status_code=422, detail=f"the request's {name!r} field is not valid JSON ({e}): "
                                                    f"{str(text)[:80]!r}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=422, detail=f"the request's {name!r} field must be a JSON object "
                                                    f"({{\"key\": value, ...}}), got {type(value).__name__} "
                                                    f"{str(text)[:80]!r}")


def _install_json_field_checks() -> None:
    """Wrap the MONAI Label endpoint functions that parse a client's JSON form field with :func:`check_json_field`
    (they are looked up by their module at each request, as :func:`_install_model_file_checks`' are). ``/infer``
    with neither an image, an upload nor a session was MONAI Label's 500 too: a 422 here."""
    import monailabel.endpoints.datastore as datastore
    import monailabel.endpoints.infer as infer

    def wrap(module, fname: str, field: str, need_input: bool = False):
        original = getattr(module, fname)
        if getattr(original, "_dfm_json_checked", False):
            return
        signature = inspect.signature(original)

        def checked(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            try:
                return run_checked(bound, args, kwargs)
            except BaseException:
                # MONAI Label removes an upload in a background task that FastAPI runs only after a successful
                # answer: every refused upload (a label for an unknown image, a file that is no image) stayed in
                # the temporary folder for good (a review filled it with 50 MB files)
                tasks = getattr(bound.get("background_tasks"), "tasks", None) or []
                for t in list(tasks):
                    if getattr(t.func, "__name__", "") == "remove_file":
                        try:
                            t.func(*t.args, **t.kwargs)
                        except OSError:
                            pass
                        tasks.remove(t)
                raise
            finally:
                _INPUTS.given = None

        def run_checked(bound, args, kwargs):
            for key in ("file", "label"):
                check_upload_name(key, getattr(bound.get(key), "filename", None))
            check_json_field(field, bound.get(field))
            if fname == "add_image" and not bound.get("image") and getattr(bound.get("file"), "filename", None):
                # (MONAI Label's route calls it with positional arguments)
                call = signature.bind(*args, **kwargs)
                call.arguments["image"] = upload_image_id(bound["file"].filename)
                args, kwargs = call.args, call.kwargs
            if not need_input:
                return original(*args, **kwargs)
            text = bound.get("params")
            params = json.loads(text) if isinstance(text, (str, bytes, bytearray)) and text else {}  # (checked above)
            if not bound.get("image") and not bound.get("session_id") and not bound.get("file"):
                raise HTTPException(status_code=422, detail="the request names no image: give an image id, a "
                                                            "session_id or an uploaded file")
            if str(getattr(bound.get("output"), "value", bound.get("output"))) == "dicom_seg":
                from monailabel.datastore.dicom import DICOMWebDatastore
                from monailabel.interfaces.utils.app import app_instance

                if not isinstance(app_instance().datastore(), DICOMWebDatastore):
                    # (MONAI Label's 500, after the whole inference)
                    raise HTTPException(status_code=422, detail="output 'dicom_seg' needs a DICOMweb datastore (a "
                                                                "PACS): this server's studies are files; ask for "
                                                                "output 'image'")
                if not params.get("label_info"):
                    # MONAI Label's rule, checked after the whole inference and answered as a 404
                    raise HTTPException(status_code=422, detail="output 'dicom_seg' needs 'label_info' in params (a "
                                                                "list of {\"name\": ..., \"model_name\": ...}, as "
                                                                "MONAI Label asks)")
            # the image is a file only where this request uploaded it (or its session holds it): a path in the query
            # or in params made the server read -- and, refused, delete -- any file of its temporary folder named
            # like an upload (a review)
            if "image" in params:  # an id there replaces the query's (MONAI Label merges params); never a path
                check_name(params["image"], "image id")
            if "model" in params and params["model"] != bound.get("model"):
                # the request's model was replaced by params': /infer/dfm_vlm_2d ran the 3D model (a review)
                raise HTTPException(status_code=422, detail=f"params name the model {params['model']!r}, the "
                                                            f"request's path {bound.get('model')!r}: send it to "
                                                            f"/infer/{params['model']}")
            _INPUTS.given = {"image": bool(bound.get("file")), "session": bool(bound.get("session_id"))}
            return original(*args, **kwargs)

        checked._dfm_json_checked = True
        checked.__wrapped__ = original
        setattr(module, fname, checked)

    original_download = datastore.download_dataset
    if not getattr(original_download, "_dfm_checked", False):
        def download_dataset(limit_cases=None):
            """``GET /datastore/dataset``: MONAI Label wrote a new zip of the whole dataset into the temporary folder
            at every call and never removed it; with no labelled image its assertion was a 500."""
            from starlette.background import BackgroundTask

            try:
                response = original_download(limit_cases)
            except AssertionError:
                raise HTTPException(status_code=404, detail="no image has a final label: there is no dataset to "
                                                            "download yet") from None
            sent, zip_file = response.background, getattr(response, "source", response.path)

            async def remove():
                if sent is not None:  # (the download's own: its file descriptor closed)
                    await sent()
                os.unlink(zip_file)

            response.background = BackgroundTask(remove)
            return response

        download_dataset._dfm_checked = True
        datastore.download_dataset = download_dataset
    wrap(infer, "run_inference", "params", need_input=True)
    wrap(datastore, "add_image", "params")
    wrap(datastore, "save_label", "params")
    wrap(datastore, "update_image_info", "info")
    wrap(datastore, "update_label_info", "info")


# MONAI Label's endpoints that are moved off the event loop (every one of these modules' routes; the DICOMweb proxy,
# the login and the OHIF files stay: the proxy awaits its request body), and those that run a model: these run one
# at a time in one thread (an inference of a volume holds gigabytes and torch already uses every core), the others
# as they come
THREADED_ENDPOINTS = ("activelearning", "batch_infer", "datastore", "infer", "info", "logs", "model", "scoring",
                      "session", "train", "wsi_infer")
MODEL_ENDPOINTS = {("infer", "POST"), ("activelearning", "POST"), ("model", "PUT"), ("wsi_infer", "POST")}
SYNC_TASK_ENDPOINTS = {("batch_infer", "POST"), ("scoring", "POST"), ("train", "POST")}  # model work with run_sync


HTTP_REQUEST_PARAM = "dfm_http_request"  # the Request a queued model endpoint watches (added to its signature)


def _server_stopping() -> bool:
    """Whether the server was told to stop (SIGTERM, SIGINT): uvicorn's handler of SIGTERM is its Server's bound
    ``handle_exit``, which sets ``should_exit``."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    return bool(getattr(getattr(handler, "__self__", None), "should_exit", False))


async def _wait_for_model(job, request, poll_s: float = 0.5):
    """The result of ``job`` (a future of :data:`lib.threads.MODEL_THREAD`), or 503 once its client has gone away or
    the server is stopping while it still waits its turn (the job then never runs). A job already running runs to
    its end: MONAI Label's inference cannot be interrupted. A review (2026-12-07): six clients that had hung up
    each had their inference run (the next user waited 200 s instead of 32 s), and a SIGTERM waited for every queued
    inference (2 minutes; a 10 s stop grace ends in a SIGKILL)."""
    import asyncio

    waiting = asyncio.wrap_future(job)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=poll_s)
        if done:
            return waiting.result()
        if job.running():
            continue
        why = "the server is stopping" if _server_stopping() else \
            "its client went away" if request is not None and await request.is_disconnected() else None
        if why and job.cancel():
            where = f"{request.method} {request.url.path}" if request is not None else "a request"
            logger.warning("%s was not run: %s before its turn on the model", where, why)
            raise HTTPException(status_code=503, detail=f"not run: {why} before its turn on the model")


def _run_to_end(endpoint, args, kwargs):
    """Run one of MONAI Label's ``async def`` endpoints, whose bodies never await, to its end in this worker thread
    (in an event loop of its own)."""
    import asyncio

    return asyncio.run(endpoint(*args, **kwargs))


def _install_worker_threads() -> None:
    """MONAI Label's endpoints are ``async def`` functions that run an inference, a Next Sample scoring or a model
    load without awaiting: each ran on the server's one event loop, so while one user's inference ran the server
    answered no one -- not ``/info``, not a label save, not another user's click -- and a SIGTERM was not even seen
    until it ended (a review: one Next Sample held the server for minutes; a stopped server still lets the request
    in progress end). Here each such route is served from a thread (the route rebuilt on MONAI Label's own router,
    same path, parameters and order): a model's work in the one model thread (:data:`lib.threads.MODEL_THREAD`),
    queued without holding another thread; the rest at once in a worker thread, where torch uses that thread alone
    (:func:`lib.threads.one_cpu_thread_here`: a second OpenMP team in the server made every inference about 25 %
    slower). The thread-local records of a request (``_INPUTS``, ``_RESULT``) stay in that request's thread."""
    import functools

    import anyio
    from fastapi.routing import APIRoute

    from lib.threads import MODEL_THREAD

    def in_thread(original):
        def endpoint(*args, **kwargs):
            one_cpu_thread_here()
            return _run_to_end(original, args, kwargs)
        return endpoint

    def in_model_thread(original, only_with_run_sync=False):
        threaded = in_thread(original)

        async def endpoint(*args, **kwargs):
            request = kwargs.pop(HTTP_REQUEST_PARAM, None)
            if only_with_run_sync and not kwargs.get("run_sync"):  # a task process starts: nothing to wait for
                return await anyio.to_thread.run_sync(functools.partial(threaded, *args, **kwargs))
            return await _wait_for_model(MODEL_THREAD.submit(_run_to_end, original, args, kwargs), request)
        return endpoint

    for name in THREADED_ENDPOINTS:
        router = importlib.import_module(f"monailabel.endpoints.{name}").router
        for i, route in enumerate(list(router.routes)):
            original = getattr(route, "endpoint", None)
            if not isinstance(route, APIRoute) or getattr(original, "_dfm_threaded", False) \
                    or not inspect.iscoroutinefunction(original):
                continue
            kinds = {(name, m) for m in route.methods}
            if kinds & MODEL_ENDPOINTS:
                endpoint = in_model_thread(original)
            elif kinds & SYNC_TASK_ENDPOINTS:  # run_sync runs the task here, in the server (a batch: every image)
                endpoint = in_model_thread(original, only_with_run_sync=True)
            else:
                endpoint = in_thread(original)
            # FastAPI reads the parameters from __signature__; no __wrapped__ (it would take the endpoint for the
            # coroutine it wraps). A queued model endpoint also takes the request (to see its client go away)
            signature = inspect.signature(original)
            if kinds & (MODEL_ENDPOINTS | SYNC_TASK_ENDPOINTS):
                from starlette.requests import Request

                signature = signature.replace(parameters=[*signature.parameters.values(), inspect.Parameter(
                    HTTP_REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request)])
            endpoint.__signature__ = signature
            for a in ("__name__", "__qualname__", "__doc__", "__module__"):
                setattr(endpoint, a, getattr(original, a))
            endpoint._dfm_threaded = True
            path = route.path[len(router.prefix):] if route.path.startswith(router.prefix) else route.path
            router.add_api_route(  # (which puts the router's prefix before the path again)
                path, endpoint, methods=sorted(route.methods), name=route.name, summary=route.summary,
                description=route.description, status_code=route.status_code, response_model=route.response_model,
                response_class=route.response_class, response_description=route.response_description,
                deprecated=route.deprecated, operation_id=route.operation_id,
                include_in_schema=route.include_in_schema, openapi_extra=route.openapi_extra,
                # the router adds its own tags, dependencies and responses again
                tags=[t for t in route.tags or [] if t not in (router.tags or [])],
                dependencies=[d for d in route.dependencies or [] if d not in (router.dependencies or [])],
                responses={k: v for k, v in (route.responses or {}).items() if k not in (router.responses or {})})
            router.routes[i] = router.routes.pop()  # in the old one's place: the order decides which path matches


RELOAD_REFUSED = ("POST /reload is not supported by this app: it dropped the running app, and the next requests "
                  "each built another one beside it (MONAI Label unloads and re-imports the app's lib package, "
                  "whose model thread and datastore lock the running requests hold; concurrent requests answered "
                  "500). A changed checkpoint is loaded without it; restart the server for new code or --conf.")


def _install_reload_refusal() -> None:
    """MONAI Label's hidden ``POST /reload`` cleared its app cache: the next requests each built an app (four at once
    in a probe, one answering a 500 as another unloaded ``lib`` under its import), beside the running one, whose
    threads and watchers stayed (the server's threads went from 13 to 30 after three reloads). Here it answers 501
    naming why, and the running app keeps serving. Only in the server (a task process has no routes)."""
    app_module = sys.modules.get("monailabel.app")
    if app_module is None:
        return
    from fastapi.routing import APIRoute

    def reload():
        raise HTTPException(status_code=501, detail=RELOAD_REFUSED)

    routes = app_module.app.router.routes
    for i, route in enumerate(list(routes)):
        if isinstance(route, APIRoute) and route.path == "/reload" and not getattr(route.endpoint, "_dfm", False):
            reload._dfm = True
            app_module.app.router.add_api_route("/reload", reload, methods=["POST"], include_in_schema=False)
            routes[i] = routes.pop()  # in the old one's place


def _install_dicom_seg_naming() -> None:
    """``/infer?output=dicom_seg``: MONAI Label writes the SEG of the result with the request's ``label_info``
    paired by *position* with the values present, so ``[lesion]`` named the lesion and left the vertebra "unknown",
    and ``[vertebra]`` named the lesion "vertebra" (a review: OHIF then showed the lesion as the vertebra). Here each
    value present is named by the result's own ``label_names``, with the client's entry of that name (its colour,
    model name) where it sent one."""
    import monailabel.endpoints.infer as endpoint

    if getattr(endpoint.nifti_to_dicom_seg, "_dfm_named", False):
        return
    original = endpoint.nifti_to_dicom_seg

    def named(series_dir, label, label_info, file_ext="*", use_itk=True):
        import numpy as np
        import SimpleITK as sitk

        from lib.datastore import segment_infos

        names = getattr(_RESULT, "label_names", None)
        entries = [x for x in (label_info or []) if isinstance(x, dict)]
        # the client's model name names the SEG series (MONAI Label reads it from the first entry)
        model_name = next((x["model_name"] for x in entries if x.get("model_name")), None)
        # the result as MONAI Label reads it (any extension: .nrrd, .mha as well as NIfTI); a copy of the pixels: a
        # view of the image read here outlived it (freed memory: values 38, 49, ... read as segments; found 2026-12-07)
        present = [int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(label))) if v != 0]
        if not present:  # MONAI Label's converter writes nothing: its answer was a 500 (no such file)
            raise HTTPException(status_code=422, detail="the result is empty: a DICOM SEG holds at least one "
                                                        "segment; ask output 'image' for an empty result")
        if isinstance(names, dict) and names:
            by_value = {int(v): str(n) for n, v in names.items() if isinstance(v, (int, float))}
            given = {str(x.get("name")): x for x in entries}
            infos = [{**given.get(by_value.get(v, ""), {}), "name": by_value.get(v, f"segment {v}")} for v in present]
        else:  # (a one-label model's result names no values: the client's entries in order, as MONAI Label pairs them)
            infos = [{**(entries[k] if k < len(entries) else {}),
                      "name": str((entries[k] if k < len(entries) else {}).get("name") or f"segment {v}")}
                     for k, v in enumerate(present)]
        # each segment's attributes as a final label's SEG has them (lib.datastore.segment_infos: MONAI Label's
        # defaults coded every segment as the spleen, algorithm "MONAILABEL", description "Unknown")
        label_info = segment_infos(present, [{**({"model_name": model_name} if model_name else {}), **x}
                                             for x in infos])
        # written as a final label's SEG is (CheckedDICOMWebDatastore.write_seg: a corrected series refused, what
        # dcmqi refuses repaired in a copy): the result of a real vendor series was a 500 after the whole inference
        # (dcmqi: "Value Representation violated"; a review, 2026-12-07)
        from monailabel.interfaces.utils.app import app_instance

        return app_instance().datastore().write_seg(
            os.path.basename(os.path.normpath(str(series_dir))), label, label_info,
            lambda src, lab, info: original(src, lab, info, file_ext=file_ext, use_itk=use_itk),
            "result", "ask output 'image'")

    named._dfm_named = True
    endpoint.nifti_to_dicom_seg = named


def discover_configs() -> dict[str, type]:
    """Model name (config module name) -> TaskConfig class, for every public module of ``lib.configs``."""
    out = {}
    for m in pkgutil.iter_modules(lib.configs.__path__):
        if m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"lib.configs.{m.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, TaskConfig) and cls.__module__ == mod.__name__ and not inspect.isabstract(cls):
                out[m.name] = cls
    return out


class DFMVLMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        available = discover_configs()
        wanted = conf.get("models", "all")
        names = sorted(available) if wanted in ("all", "", None) else [n.strip() for n in wanted.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"--conf models: unknown model(s) {unknown}; available: {sorted(available)}")
        # (a misspelt model in --conf <model>_checkpoint was ignored: the sample model was served)
        unknown = sorted(k for k in conf if k.endswith("_checkpoint") and k[:-len("_checkpoint")] not in available)
        if unknown:
            raise ValueError(f"--conf {unknown[0]}: no model {unknown[0][:-len('_checkpoint')]!r}; the models are "
                             f"{sorted(available)} (--conf <model>_checkpoint FILE)")
        self.models: dict[str, TaskConfig] = {}

        def init_configs():  # (they read their checkpoints: torch work that must not leave the main thread a team)
            for n in names:
                c = available[n]()
                c.init(n, self.model_dir, conf, None)
                self.models[n] = c

        in_a_passing_thread(init_configs)
        logger.info("DFM+VLM models: %s (model dir %s)", names, self.model_dir)
        _install_request_checks()
        _install_model_file_checks()
        _install_dicom_seg_naming()
        _install_consistent_downloads()
        _install_json_field_checks()
        _install_session_checks()
        _install_worker_threads()
        _install_reload_refusal()
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="DFM+VLM segmentation",
                         description="Binary discrete flow matching segmentation conditioned by a vision-language "
                                     "model", version=lib.__version__)

    def server_mode(self, mode: bool):
        """MONAI Label calls this in the server process only (not in its training and scoring subprocesses, which
        build the app again): the temporary files of writes that a ``kill -9`` or a crash cut short are removed
        here, in the model folder (checkpoints, train stats) and the studies' index and label folders, when nothing
        has written them for a minute (:func:`lib.checkpoint.remove_stale_temporaries`; a review found a
        checkpoint's still there after two restarts)."""
        super().server_mode(mode)
        if not mode:
            return
        os.environ[SERVER_PID] = str(os.getpid())  # for the task processes it starts (end_with_the_server)
        one_cpu_thread_here()  # the main thread runs the event loop; the models run in lib.threads.MODEL_THREAD
        from lib.checkpoint import remove_stale_temporaries

        folders = [self.model_dir, *(os.path.join(self.model_dir, n) for n in self.models)]
        studies = self.studies if isinstance(self.studies, str) and os.path.isdir(self.studies) else None
        if studies:
            labels = os.path.join(studies, "labels")
            folders += [studies, *(os.path.join(labels, t) for t in (os.listdir(labels) if os.path.isdir(labels)
                                                                     else []))]
        for folder in folders:
            try:
                removed = remove_stale_temporaries(folder)
            except OSError as e:
                logger.warning("cannot look for interrupted writes in %s: %s", folder, e)
                continue
            if removed:
                logger.warning("removed %d temporary file(s) of interrupted writes in %s: %s", len(removed), folder,
                               [f.name for f in removed])

    def init_infers(self):
        out = {}
        for n, c in self.models.items():
            out[n] = c.infer()
            if _as_bool("--conf interactive", self.conf.get("interactive", "true")):
                out[f"{n}_interactive"] = c.interactive_infer()  # clicks, from the same checkpoint
        return out

    def init_trainers(self):
        return {n: c.trainer() for n, c in self.models.items()}

    def init_strategies(self):
        s = {"random": FairRandom(), "first": First()}
        for c in self.models.values():
            s.update(c.strategy())
        return s

    def init_scoring_methods(self):
        s = {}
        for c in self.models.values():
            s.update(c.scoring_method())
        return s

    def batch_infer(self, request, datastore=None):
        """``POST /batch/infer/<model>``: MONAI Label's batch task assumes GPUs (on a CPU server it divided by an
        empty device list: 500), runs every image of the datastore through every model (a CT through the 2D model:
        422, and its one-worker loop stopped at that image, labelling nothing after it) and lets one bad image end
        the batch. Here: an unknown model is a 404; only images of the model's dimension are taken (as the
        uncertainty scoring does); without CUDA the batch runs on the CPU; an image that fails is reported in the
        result (``{"error": ...}``) and the others go on."""
        import torch

        from lib.transforms import image_spatial_dims

        model = request.get("model")
        task = self._infers.get(model)
        if task is None:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(self._infers)}")
        ds = datastore if datastore else self.datastore()
        request = dict(request)
        if not torch.cuda.is_available():
            request["multi_gpu"], request["device"] = False, "cpu"
        images = self._batch_infer.get_images(request, ds)
        keep = []
        for image_id in images:
            try:
                if image_spatial_dims(ds.get_image_uri(image_id)) == task.dimension:
                    keep.append(image_id)
            except Exception as e:  # noqa: BLE001 - an unreadable image is reported, not fatal
                logger.warning("batch infer %s: cannot read %s: %s", model, image_id, e)
        request["images"] = keep

        def infer_one(req, store):
            try:
                return self.infer(req, store)
            except HTTPException as e:
                logger.warning("batch infer %s: %s: %s", model, req.get("image"), e.detail)
                return {"error": str(e.detail)}

        return self._batch_infer(request, ds, infer_one)

    def init_datastore(self):
        """The folder datastore checks labels before storing them (lib.datastore.CheckedLocalDatastore); an index
        left unreadable by a kill is set aside and rebuilt from the files (lib.datastore.set_aside_unreadable_index)."""
        from monailabel.datastore.local import LocalDatastore

        from lib.datastore import CheckedLocalDatastore, set_aside_unreadable_index, watch_renames

        if os.path.isdir(self.studies):
            set_aside_unreadable_index(self.studies)
        ds = super().init_datastore()
        if type(ds) is LocalDatastore:
            ds.__class__ = CheckedLocalDatastore  # same folder, index and settings; only save_label differs
            watch_renames(ds)
        return ds

    def _init_dicomweb_datastore(self):
        """MONAI Label's DICOMweb datastore, with the checked series conversion of lib.datastore."""
        from lib.datastore import CheckedDICOMWebDatastore

        ds = super()._init_dicomweb_datastore()
        ds.__class__ = CheckedDICOMWebDatastore  # same client, cache and settings; only get_image_uri/save_label differ
        # a DICOMweb store holds CT/MR volumes: segments are named by the 3D models' label maps (value -> name)
        ds.default_label_names = {v: n for c in self.models.values() if getattr(c, "dimension", 3) == 3
                                  for n, v in reversed(list(c.labels.items()))}
        return ds

    def info(self):
        meta = super().info()
        # the segments 3D Slicer makes for every image: the models' labels, then "uncertain" (a result's segment
        # where the samples disagree: without a segment of that name Slicer dropped its voxels), then "background"
        # (DeepEdit's negative clicks). MONAI Label merged them model by model: "background" came before the 3D
        # labels, and Slicer's Submit Label idx, which counts it, was off by one for them
        labels = [n for n in meta.get("labels") or [] if n not in ("uncertain", "background")]
        meta["labels"] = labels + ["uncertain"] + (["background"] if "background" in (meta.get("labels") or []) else [])
        not_ready = {}
        for n, task in self._infers.items():
            ok, reason = task.readiness()
            if not ok:
                not_ready[n] = reason
        meta["models_not_ready"] = not_ready
        return meta

    # -- requests: clear HTTP errors instead of bare 500s ------------------------------------------------------
    def infer(self, request, datastore=None):
        # MONAI Label removes an upload (the image, a scribbles label) in a background task that FastAPI runs only
        # after an answer: a refused upload stays until the /infer wrapper (_install_json_field_checks) runs those
        # tasks itself; only files this request uploaded are ever removed (a path sent in the query was deleted)
        return self._infer(request, datastore)

    def _infer(self, request, datastore=None):
        import concurrent.futures

        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and not image.strip() and "session" not in request:
            # MONAI Label leaves the image empty for a session_id it does not know (it was "image id is empty")
            raise HTTPException(status_code=404, detail="the request names no image: its session_id is unknown or "
                                                        "expired (upload the image again: PUT /session), or no "
                                                        "image, file or session_id was sent")
        if "timeout" in request:
            # MONAI Label waits this long for an inference run in its thread pool
            # (MONAI_LABEL_INFER_CONCURRENCY): "abc" and a TimeoutError were 500s
            from lib.infers.dfm_vlm import _as_float

            try:
                request["timeout"] = _as_float("timeout", request["timeout"])
                if not 0 < request["timeout"] < float("inf"):
                    raise ConfigError(f"parameter 'timeout' must be a number of seconds > 0, got "
                                      f"{request['timeout']!r}")
            except ConfigError as e:
                raise HTTPException(status_code=422, detail=f"{model}: {e}") from None
        ds = datastore or self.datastore()
        server_file = isinstance(image, str) and self._server_made_file(image)
        if isinstance(image, str) and not server_file:
            check_name(image, "image id")  # a path is only taken when this server made it (an upload, a session)
        try:  # a DICOMweb datastore converts (and checks) the series here
            known = not isinstance(image, str) or server_file or bool(ds.get_image_uri(image))
        except InputError as e:
            raise HTTPException(status_code=422, detail=f"{model}: {e}") from e
        if not known:
            raise HTTPException(status_code=404, detail=f"unknown image id {image!r} (not in the datastore)")
        ok, reason = self._infers[model].readiness()
        if not ok:
            raise HTTPException(status_code=503, detail=f"model {model!r} is not ready: {reason}")
        task = self._infers[model]
        if getattr(task, "interactive", False):  # Slicer's DeepEdit mode sends the points of every /info label
            def names(t):
                return list(t.labels) if isinstance(t.labels, (dict, list, tuple)) else [t.labels]

            mine = set(names(task))
            clickable = sorted(mine - {"background", "uncertain"})
            try:  # the task checks this too (lib.clicks.check_no_stray_points); here other models' names count
                check_no_stray_points(request, mine, {n for t in self._infers.values() for n in names(t)})
            except ClickError as e:
                raise HTTPException(status_code=422, detail=f"{model}: {e}") from None
            # 3D Slicer's DeepEdit mode sends the points of /info's labels only, and "label": the selected segment. A
            # segment the user added ("Segment_1") keeps its points to itself: the request came with none and the
            # click did nothing, without a word
            label = request.get("label")
            sent = [n for n in ("foreground", "background", *mine)
                    if isinstance(request.get(n), (list, tuple)) and len(request.get(n))]
            values = {str(v) for v in task.labels.values()} if isinstance(task.labels, dict) else set()
            if isinstance(label, str) and label.strip() and label not in mine | values | {"foreground"} and not sent:
                raise HTTPException(status_code=422, detail=f"{model}: the selected segment {label!r} is not a label "
                                                            f"of this model, so its points were not sent; select one "
                                                            f"of its structures {clickable} (or 'background' for a "
                                                            "negative click)")
        try:
            # MONAI Label tests the raw value: "false" (a string) saved the label
            request["save_label"] = _as_bool("save_label", request.get("save_label", False))
            if not _as_bool("result_write_to_file", request.get("result_write_to_file", True)):
                # the answer of /infer is a file: MONAI Label then tested an array for truth (a 500)
                raise ConfigError("'result_write_to_file' false is not served over HTTP (the answer is the label "
                                  "file); use the core (lib.evaluation.predict_item) for arrays")
            if request["save_label"] and _as_bool("uncertain_segment", request.get("uncertain_segment", False)) \
                    and request.get("label_tag", "original") == "final":
                raise ConfigError("'save_label' with label_tag 'final' and 'uncertain_segment' would store the "
                                  "uncertain region as a final label: ask without uncertain_segment")
            final = request["save_label"] and request.get("label_tag", "original") == "final"
            # from the check below to the save: a label saved meanwhile (PUT /datastore/label, now in another thread)
            # was replaced by the model's result (a review)
            with DATASTORE_WRITES if final else contextlib.nullcontext():
                if final and isinstance(image, str) and not server_file and \
                        "final" in (ds.get_labels_by_image_id(image) or {}):
                    # /infer needs MONAI Label's lowest role; it replaced an annotator's final label with the model's
                    # result, keeping no copy (a review). An annotator replaces a label with PUT /datastore/label
                    raise HTTPException(status_code=409, detail=f"{model}: image {image!r} has a final label "
                                                                "already; an inference does not replace it (save it "
                                                                "with label_tag 'original', or submit the label: PUT "
                                                                "/datastore/label)")
                _RESULT.label_names = None
                out = super().infer(request, datastore)
            _RESULT.label_names = ((out or {}).get("params") or {}).get("label_names") if isinstance(out, dict) \
                else None
            return out
        except concurrent.futures.TimeoutError:
            if not getattr(self, "_infers_threadpool", None):  # not MONAI Label's wait (a socket's): not a 504
                raise
            raise HTTPException(status_code=504, detail=f"{model}: the inference took longer than the request's "
                                                        f"timeout ({request.get('timeout')} s); it is still running "
                                                        "on the server, and its result is dropped") from None
        except (InputError, ConfigError, VLMError) as e:
            raise HTTPException(status_code=422, detail=f"{model}: {e}") from e
        except (ModelNotReady, CheckpointError) as e:
            raise HTTPException(status_code=503, detail=f"model {model!r} is not ready: {e}") from e
        except NonFiniteOutput as e:  # the network's NaN: named (was MONAI Label's bare "Internal Server Error")
            raise HTTPException(status_code=500, detail=f"{model}: {e}") from e

    def _server_made_file(self, path: str) -> bool:
        """A file MONAI Label itself wrote for this request: an upload (``tempfile.NamedTemporaryFile`` in the
        temporary folder, run_inference) or a session's image (under the sessions folder), and only when this
        request sent a file or a session_id (the /infer wrapper records which: ``_INPUTS``). Any other path in
        ``image`` would let a client make the server read its files: a path in the query named like an upload was
        read, and deleted when refused (a review); ``params`` may not name the image at all."""
        from lib.infers.dfm_vlm import is_session_image, is_upload

        given = getattr(_INPUTS, "given", None) or {}
        if "\x00" in path:  # os.path raises on it
            return False
        # the same rules that seed such an image by its content
        return (given.get("image") and is_upload(path)) or (given.get("session") and is_session_image(path))

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(status_code=404, detail=f"unknown strategy {strategy!r}; available: "
                                                        f"{sorted(self._strategies)}")
        try:
            return super().next_sample(request)
        except InputError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        except (ModelNotReady, CheckpointError) as e:  # a ranking strategy without a served model (was: {})
            raise HTTPException(status_code=503, detail=f"strategy {strategy!r}: the model is not ready: {e}; the "
                                                        "strategies 'random' and 'first' serve an image without "
                                                        "a model") from e

    def async_scoring(self, method, params=None):
        """MONAI Label's background scoring; after a Next Sample (``method`` None) a method is queued only when none
        of its runs waits or runs and some image's score is stale (:func:`background_scorings_to_queue`: every
        Next Sample queued one subprocess per method, each loading the app, whatever was stale or queued). The same
        rule in a training's subprocess (not server mode), which asks the server ``POST /scoring/<method>`` for
        every method when it ends: in name order, so after a 3D training the 2D scoring ran with nothing to score
        and the 3D rescoring was refused as "Scoring Task is Already Running" (a review)."""
        if method is not None or not self._scoring_methods:
            return super().async_scoring(method, params)
        from lib.activelearning.uncertainty import background_scorings_to_queue

        result = {}
        for m, why in background_scorings_to_queue(self._scoring_methods, self.datastore()).items():
            if why:
                logger.debug("background scoring %s not queued: %s", m, why)
                result[m] = why
            else:
                result[m] = super().async_scoring(m, params)
        return result

    SCORING_WATCH_S = 30.0  # how often the server looks whether a model's checkpoint changed (a stat per model)

    def on_init_complete(self):
        """MONAI Label's (its scoring at start, when scoring updates automatically), then the watch that queues a
        model's rescoring after its checkpoint changes (:meth:`queue_scoring_of_new_checkpoints`)."""
        super().on_init_complete()
        if self._server_mode and self._auto_update_scoring and self._scoring_methods:
            self._scoring_watch_stop = threading.Event()
            threading.Thread(target=self._watch_checkpoints_for_scoring, args=(self._scoring_model_times(),),
                             name="dfm-scoring-watch", daemon=True).start()

    def _scoring_model_times(self) -> dict:
        """Each scoring method's served checkpoint time (None: none served)."""
        out = {}
        for m, scoring in self._scoring_methods.items():
            try:
                out[m] = scoring.model_ts()
            except Exception:  # noqa: BLE001 - no checkpoint served, or not a DFM scoring
                out[m] = None
        return out

    def _watch_checkpoints_for_scoring(self, seen: dict) -> None:
        from lib.threads import MODEL_THREAD

        stop = self._scoring_watch_stop
        while not stop.wait(self.SCORING_WATCH_S):
            try:
                if self._scoring_model_times() != seen:  # (the check itself runs where the models run)
                    MODEL_THREAD.submit(self.queue_scoring_of_new_checkpoints, seen).result()
            except RuntimeError:  # the model thread has shut down: the server is stopping
                return
            except Exception as e:  # noqa: BLE001 - the next look tries again
                logger.warning("scoring watch: %s: %s", type(e).__name__, e)

    def queue_scoring_of_new_checkpoints(self, seen: dict) -> list[str]:
        """The background scoring of each method whose checkpoint changed since ``seen`` (updated here), queued when
        one of its images' scores is stale and none of its runs waits or runs (then it is looked at again next
        time). A training asks MONAI Label's ``POST /scoring/<method>`` when it ends, which refuses while any
        scoring runs ("Scoring Task is Already Running"): a long 3D scoring at start kept the 2D model's rescoring
        after its publish from ever being queued (a review)."""
        from lib.activelearning.uncertainty import scoring_in_background, stale_images

        now = self._scoring_model_times()
        queued = []
        for m, scoring in self._scoring_methods.items():
            if now.get(m) == seen.get(m) or scoring_in_background(m):
                continue
            if stale_images(scoring, self.datastore()):
                MONAILabelApp.async_scoring(self, m)
                queued.append(m)
                logger.info("checkpoint of %s changed: its scoring queued", m)
            seen[m] = now.get(m)
        return queued

    def scoring(self, request, datastore=None):
        method = request.get("method")
        if method not in self._scoring_methods:
            raise HTTPException(status_code=404, detail=f"unknown scoring method {method!r}; available: "
                                                        f"{sorted(self._scoring_methods)}")
        return super().scoring(request, datastore)
