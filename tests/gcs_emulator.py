"""gcp-storage-emulator with two behaviours of real GCS it lacks: generation headers and
generation preconditions. Test-only.

Real GCS answers every object download with `x-goog-generation` / `x-goog-metageneration`.
The emulator sends neither, so tensorstore cannot learn the generation of a manifest it read
back, and its next conditional write of that manifest fails ("Malformed StorageGeneration"):
seen in 1 of 4 runs of tests/test_storage.py, depending on tensorstore's cache. This launcher
adds the two headers.

Real GCS also refuses an upload or a delete whose `ifGenerationMatch` names another generation
than the live one (0: the object must not exist) with 412 Precondition Failed; the emulator
ignores the parameter, so create-if-absent (the gs:// workdir lock) would always succeed. The
launcher checks it: the emulator's server is one thread, so check and write are atomic, as
they are on GCS. Then it runs the emulator's own command line.

    python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory ...
"""

from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert, _delete = objects.download, objects.insert, objects.delete


def download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]
    except NotFound:
        pass  # the emulator's own handler answers 404
    return _download(request, response, storage, *args, **kwargs)


def _precondition_failed(request, response, storage, name) -> bool:
    """Answer 412 (and return True) if ifGenerationMatch names another than the live generation."""
    wanted = request.query.get("ifGenerationMatch")
    if not wanted or name is None:
        return False
    try:
        live = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
    except NotFound:
        live = "0"
    if wanted[0] == live:
        return False
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "Precondition Failed"}})
    return True


def _upload_name(request):
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data if isinstance(request.data, dict) else {}
    return (data.get("meta") or {}).get("name") or data.get("name")


def insert_with_precondition(request, response, storage, *args, **kwargs):
    if _precondition_failed(request, response, storage, _upload_name(request)):
        return None
    return _insert(request, response, storage, *args, **kwargs)


def delete_with_precondition(request, response, storage, *args, **kwargs):
    if _precondition_failed(request, response, storage, request.params["object_id"]):
        return None
    return _delete(request, response, storage, *args, **kwargs)


# Before the server module binds its routes.
objects.download = download_with_generation
objects.insert = insert_with_precondition
objects.delete = delete_with_precondition

if __name__ == "__main__":
    from gcp_storage_emulator import __main__ as emulator

    emulator.main()
