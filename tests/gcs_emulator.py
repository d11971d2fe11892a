"""gcp-storage-emulator with the generation headers real GCS sends on downloads.

Real GCS answers every object download with `x-goog-generation` / `x-goog-metageneration`.
The emulator sends neither, so tensorstore cannot learn the generation of a manifest it read
back, and its next conditional write of that manifest fails ("Malformed StorageGeneration"):
seen in 1 of 4 runs of tests/test_storage.py, depending on tensorstore's cache. This launcher
adds the two headers and then runs the emulator's own command line. Test-only.

    python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory ...
"""

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]
    except NotFound:
        pass  # the emulator's own handler answers 404
    return _download(request, response, storage, *args, **kwargs)


objects.download = download_with_generation  # before the server module binds its routes

if __name__ == "__main__":
    from gcp_storage_emulator import __main__ as emulator

    emulator.main()
