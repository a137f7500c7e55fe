"""manifest.json of a split, and checking shards against it.

One manifest per split (<output>/<split>/manifest.json) lists its shards in order, and for every shard its size,
sha256 and samples; for every sample (one book) its key, metadata, token count and the byte offset of its tokens
inside the tar. Readers use the offsets to read any part of a book without parsing the tar.

While `prepare` runs, the manifest is rewritten after every completed shard with "complete": false; it is the
record of which shards are finished, so a re-run knows where to go on.
"""

import io
import json
import tarfile

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.storage import display, join, write_bytes

FORMAT = "memmamba-shards/1"
NAME = "manifest.json"
# what the readers of a complete manifest use besides its format
COMPLETE_KEYS = ("complete", "tokenizer_checksum", "dtype", "shards", "num_books", "num_tokens")


def shard_name(index):
    return f"shard-{index:06d}.tar"


def _prepared_splits(fs, split_dir):
    """Which splits the folder above a missing one holds, for the error: a misspelt or unprepared split."""
    parent = split_dir.rstrip("/").rsplit("/", 1)[0]
    if not fs.isdir(parent):
        return ""
    splits = sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(parent, detail=False)
                    if fs.isfile(join(path, NAME)))
    return f" (prepared splits there: {', '.join(splits)})" if splits else " (no prepared splits there)"


def load(fs, split_dir):
    """The manifest of a split folder; refuses a missing folder, a missing or unfinished manifest."""
    path = join(split_dir, NAME)
    if not fs.isdir(split_dir):
        raise DataError(f"{display(fs, split_dir)}: no such directory{_prepared_splits(fs, split_dir)}")
    try:
        manifest = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise DataError(f"{display(fs, path)}: missing (run `python -m data_pipeline prepare` first)") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{display(fs, path)}: not valid JSON ({error})") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise DataError(f"{display(fs, path)}: format {found!r}, expected {FORMAT!r}")
    if not manifest.get("complete", True):
        raise DataError(f"{display(fs, path)}: unfinished (its prepare run stopped early; run it again)")
    missing = [key for key in COMPLETE_KEYS if key not in manifest]
    if missing:   # edited by hand
        raise DataError(f"{display(fs, path)}: no {', '.join(missing)}; prepare the split again")
    return manifest


def save(fs, split_dir, manifest):
    write_bytes(fs, join(split_dir, NAME), (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())


def require_tokenizer(fs, split_dir, manifest, checksum):
    """Refuse shards made with another tokenizer than the one (by sha256 checksum) the caller uses."""
    if checksum is not None and manifest["tokenizer_checksum"] != checksum:
        made_with = manifest["tokenizer_checksum"]
        raise DataError(
            f"{display(fs, join(split_dir, NAME))}: shards were made with tokenizer {made_with[:12]}..., "
            f"not {checksum[:12]}..."
        )


def check_shard(fs, path, shard, dtype):
    """Check a shard against its manifest entry: size, tar headers, member names and the tokens' .npy headers.

    This is cheap (a few small reads per book) and catches truncated, overwritten and mismatched shards; a flipped
    byte inside token data is only caught by the sha256 check of `python -m data_pipeline verify`.
    """
    where = display(fs, path)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise DataError(f"{where}: missing (listed in {NAME})") from None
    if size != shard["bytes"]:
        raise DataError(f"{where}: {size} bytes, {NAME} says {shard['bytes']} (truncated or overwritten)")
    with fs.open(path, "rb") as file:
        try:
            members = tarfile.open(fileobj=file, mode="r:").getmembers()
        except tarfile.TarError as error:
            raise DataError(f"{where}: corrupt tar ({error})") from None
        expected = [f"{s['key']}.{ext}" for s in shard["samples"] for ext in ("json", "npy")]
        if [m.name for m in members] != expected:
            raise DataError(f"{where}: corrupt, or its members do not match {NAME}")
        for sample, member in zip(shard["samples"], members[1::2]):
            end = sample["offset"] + sample["num_tokens"] * np.dtype(dtype).itemsize
            header_size = sample["offset"] - member.offset_data
            if not 0 < header_size <= 4096 or end != member.offset_data + member.size:
                raise DataError(f"{where}: {member.name} does not match {NAME}")
            file.seek(member.offset_data)
            if _npy_header(file.read(header_size)) != ((sample["num_tokens"],), np.dtype(dtype)):
                raise DataError(f"{where}: {member.name} has a corrupt .npy header")


def _npy_header(data):
    """(shape, dtype) from the header bytes of a .npy file, or None if they are not a valid header."""
    header = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(header)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(header)
    except ValueError:
        return None
    return shape, dtype
