"""One file layer for everything emotune reads and leaves: local paths (NFS included) and s3://, gs:// URIs.

Built on pyarrow.fs, which Ray Tune and Train use for the same storage_path, so credentials and endpoints are
read the same way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile, AWS_ENDPOINT_URL for S3-compatible
servers; GOOGLE_APPLICATION_CREDENTIALS for GCS, CLOUD_STORAGE_EMULATOR_ENDPOINT for a GCS emulator, where
`gs://anonymous@BUCKET/...` skips the credential lookup, as for a public bucket). A location is a plain string; a
URI is never made a `Path` (that would turn `s3://b/k` into `s3:/b/k`).
"""
from __future__ import annotations

import fnmatch
import os
import tempfile

from distributed.errors import StorageError

GCS_RETRY_S = 20
# The first request of a command to a bucket: an endpoint that does not answer is then a wrong one (or no network),
# to be said in seconds
FIRST_TOUCH_RETRY_S = 3


def is_uri(location) -> bool:
    return "://" in str(location)


def resolve(location) -> str:
    """Absolute local path (Ray wants one) or the URI unchanged."""
    location = str(location)
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(base, *parts: str) -> str:
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def bucket(location) -> tuple[str, str]:
    """A URI's bucket -> (its own URI, its name): `gs://anonymous@b/k` -> (`gs://anonymous@b`, `b`)."""
    scheme, rest = str(location).split("://", 1)
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}", authority.rsplit("@", 1)[-1]


def name(location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def problem(exc: BaseException, location: str) -> StorageError:
    """An OSError from pyarrow (or the OS) -> one line naming the problem and the fix."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    missing = bucket(location)[1] if is_uri(location) else location
    variable = "CLOUD_STORAGE_EMULATOR_ENDPOINT" if location.startswith("gs://") else "AWS_ENDPOINT_URL"
    endpoint = os.environ.get(variable, "the default endpoint")
    if "NO_SUCH_BUCKET" in text or "bucket does not exist" in text.lower():
        return StorageError(f"{location}: bucket {missing!r} does not exist; create it or fix the location")
    if "NETWORK_CONNECTION" in text or "connect to server" in text.lower() or "curlCode" in text:
        return StorageError(f"{location}: cannot reach the object store at {endpoint}; check {variable} "
                            f"and the network")
    if location.startswith("s3://") and not aws_credentials_set():
        return StorageError(f"{location}: no AWS credentials found ({text[:100]}); set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, before running emotune")
    if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                               "credentials", "Forbidden", "403", "UNAUTHENTICATED", "PERMISSION_DENIED")):
        return StorageError(f"{location}: access denied ({text[:120]}); set credentials that may use it: "
                            f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for s3://, "
                            f"GOOGLE_APPLICATION_CREDENTIALS for gs://")
    if isinstance(exc, FileNotFoundError) or "NotFound" in text or "No such file" in text:
        return StorageError(f"{location}: no such file or directory; check the path")
    return StorageError(f"{location}: {text}")


def aws_credentials_set() -> bool:
    """Whether the environment names AWS credentials (an instance role is the one source this cannot see)."""
    shared = os.path.expanduser(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))
    return bool(os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.path.exists(shared))


def filesystem(location, retry_s: float = GCS_RETRY_S):
    """-> (pyarrow FileSystem, path inside it). retry_s: how long a gs:// request is retried."""
    import pyarrow.fs as pafs

    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), resolve(location)
    uri = location
    if location.startswith("gs://") and "?" not in location:
        # google-cloud-cpp retries an unreachable endpoint for 15 minutes by default; a wrong endpoint or a network
        # problem should be one clear line within seconds (Ray's own uploads keep the default)
        uri = f"{location}?retry_limit_seconds={retry_s:g}"
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:
        raise problem(exc, location) from None


def _info(location, retry_s: float = GCS_RETRY_S):
    fs, path = filesystem(location, retry_s)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise problem(exc, str(location)) from None


def exists(location) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type != pafs.FileType.NotFound


def is_file(location) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def why_missing(location) -> str:
    """For a location that is not there: the bucket is missing, or the file."""
    location = str(location)
    if is_uri(location):
        uri, missing = bucket(location)
        if not exists(uri):
            return f"{location}: bucket {missing!r} does not exist; create it or fix the location"
    return f"{location}: no such file"


def is_dir(location) -> bool:
    """For object stores: whether any key lies under location/."""
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.Directory


def read_bytes(location) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as exc:
        raise problem(exc, str(location)) from None


def read_text(location) -> str:
    return read_bytes(location).decode()


def write_atomic(path, data: bytes) -> None:
    """A local file that readers never see half written: a temporary file beside it, then a rename."""
    path = resolve(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_bytes(location, data: bytes) -> None:
    """Readers never see half a file: locally write_atomic; an object store's PUT is atomic."""
    location = str(location)
    if not is_uri(location):
        write_atomic(location, data)
        return
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exc:
        raise problem(exc, location) from None


def write_text(location, text: str) -> None:
    write_bytes(location, text.encode())


def delete(location) -> None:
    fs, path = filesystem(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise problem(exc, str(location)) from None


def list_dir(location) -> list[str]:
    """Names directly under a directory (files and subdirectories), sorted; [] when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise problem(exc, str(location)) from None
    return sorted(i.base_name for i in infos)


def list_files(location) -> list[str]:
    """Paths of every file under location, relative to it ('/'-separated), sorted; [] when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise problem(exc, str(location)) from None
    root = path.rstrip("/") + "/"
    return sorted(i.path[len(root):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(root))


def glob(location, pattern: str) -> list[str]:
    """Entries directly under location whose names match `pattern` (fnmatch), as full locations, sorted."""
    return [join(location, n) for n in list_dir(location) if fnmatch.fnmatch(n, pattern)]


def upload(local_file, location) -> None:
    with open(local_file, "rb") as f:
        write_bytes(location, f.read())


def download(location, local_file) -> None:
    write_atomic(local_file, read_bytes(location))


def upload_dir(local_dir, location) -> None:
    """Every file under local_dir to the same relative place under location."""
    for root, _, files in os.walk(local_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local_dir)
            upload(os.path.join(root, f), join(location, *rel.split(os.sep)))


def check_writable(location, what: str = "--storage-path") -> None:
    """A clear error before any work starts, rather than a failure after the first trial: the bucket exists,
    the endpoint answers, the credentials may write. Leaves the location (a directory) in place."""
    location = str(location)
    if not is_uri(location):
        path = resolve(location)
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise StorageError(f"{path}: cannot write results there ({exc.strerror or exc}); choose a writable "
                               f"{what}") from None
        return
    import pyarrow.fs as pafs

    uri, missing = bucket(location)
    if _info(uri, FIRST_TOUCH_RETRY_S).type == pafs.FileType.NotFound:
        raise StorageError(f"{location}: bucket {missing!r} does not exist; create it or fix the {what}")
    probe = join(location, ".emotune-write-test")
    write_bytes(probe, b"")
    delete(probe)


def check_reachable(location) -> None:
    """For a URI: its bucket's endpoint answers (an error line within seconds, not after the retries of a
    request to an endpoint that answered before)."""
    if is_uri(location):
        _info(bucket(location)[0], FIRST_TOUCH_RETRY_S)
