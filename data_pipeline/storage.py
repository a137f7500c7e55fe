"""Local paths and fsspec URLs behind one small interface.

Every module resolves its inputs and outputs here, so a local folder, file://, memory:// (tests) and cloud
buckets (gs:// with gcsfs, s3:// with s3fs) go through the same code.
"""

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from data_pipeline.errors import DataError

# fsspec knows these protocols but needs an optional package to reach them.
_OPTIONAL_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs"}


def resolve(url):
    """(filesystem, path inside it) for a local path or any fsspec URL."""
    url = os.fspath(url)
    try:
        return url_to_fs(url)
    except ImportError:
        protocol = url.split("://", 1)[0]
        package = _OPTIONAL_PACKAGES.get(protocol, f"the fsspec backend for {protocol}://")
        raise DataError(f"{url}: {protocol}:// needs the optional package {package} (pip install {package})") from None
    except ValueError as error:  # an unknown protocol
        raise DataError(f"{url}: {error}") from None


def check_folder(url):
    """Refuse an output folder that is a file or cannot be made, before any work is done for it."""
    fs, path = resolve(url)
    if fs.exists(path) and not fs.isdir(path):
        raise DataError(f"{display(fs, path)}: is a file, not a folder")
    if not is_local(fs):  # object stores have no folders to make; access is only known at the first write
        return
    problem = local_folder_problem(path)
    if problem:
        raise DataError(f"{path}: cannot be made, {problem}")


def outermost_new_folder(path):
    """The outermost folder that making the local folder `path` would create: it or a parent; None if it exists."""
    return next((folder for folder in [*reversed(Path(path).parents), Path(path)] if not folder.exists()), None)


def local_folder_problem(path):
    """Why a folder at a local path could not be made or written to, or None. Leaves nothing behind.

    The only sure test (permissions, read-only mounts, /proc, where root passes every permission check) is to make
    a folder in the nearest existing parent, and remove it.
    """
    parent = Path(path)
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".check-"))
    except OSError as error:
        return f"{parent} is not writable ({error.strerror})"
    return None


@contextlib.contextmanager
def output_lock(url):
    """Hold <output>/.lock while a run writes into a local output, and refuse a second run into it meanwhile.

    Two runs would delete each other's partial files. The lock is the kernel's (flock), so it goes with the process
    however that ends; the empty file stays, unless the run wrote nothing: then the folders it made go too.
    Object stores and file systems mounted without locks have none: there, one run at a time is up to you.
    """
    fs, path = resolve(url)
    if not is_local(fs):
        yield
        return
    made = outermost_new_folder(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{path}: another run is writing into it (it holds {path}/.lock)") from None
        except OSError as error:   # a file system mounted without locks (Lustre's noflock, NFS's nolock)
            if error.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                raise
        try:
            yield
        finally:   # while the lock is held, so that no other run is in the folder
            if made is not None and [p.name for p in made.rglob("*") if p.is_file()] == [".lock"]:
                shutil.rmtree(made)


def join(path, *parts):
    return "/".join([path.rstrip("/"), *parts])


def is_local(fs):
    return isinstance(fs, LocalFileSystem)


def display(fs, path):
    """How to name a file in messages: a plain path when local, the full URL otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def partial_name(path):
    """The temporary name a file is written under before it is renamed into place.

    A hidden name, so nothing that lists `shard-*.tar` or reads `manifest.json` ever sees an unfinished file.
    """
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.partial"


def is_process_local(fs):
    """Whether files in fs exist only inside this process (memory://), out of reach of worker processes."""
    return isinstance(fs, MemoryFileSystem)


def open_partial(fs, path):
    """A new file to write `path` through; `commit` renames it into place once it is complete."""
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    return open(partial_name(path), "wb") if is_local(fs) else fs.open(partial_name(path), "wb")


def commit(fs, file, path):
    """Close a file from open_partial and rename it to path: path is either absent or complete, never partial."""
    if is_local(fs):
        file.flush()
        os.fsync(file.fileno())  # the bytes must be on disk before the rename makes them visible
        file.close()
        os.replace(partial_name(path), path)
    else:
        # Object stores publish an object only once its upload is complete; there the rename is a copy.
        file.close()
        fs.mv(partial_name(path), path)


def write_bytes(fs, path, data):
    """Write a small file atomically."""
    file = open_partial(fs, path)
    file.write(data)
    commit(fs, file, path)
