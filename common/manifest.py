"""Dataset manifest format and shard assignment (pure).

A dataset is ``s3://<data-bucket>/datasets/<hash>/manifest.json`` over chunks (Arrow
IPC stream, uncompressed so readers map them without copies). Format 2 keeps chunks
in a bucket-wide pool, ``chunks/<sha256>.arrow``: a streaming writer stores each chunk
before it knows the dataset's hash, and a chunk any dataset already stored is not sent
again. Format 1 (still read) kept ``chunk-NNNNN.arrow`` under the dataset's prefix.
Format 3 references parquet that already sits in the store instead of copying it: each
chunk is a range of row groups of one object, named by bucket, key, size and ETag, and
its ``sha256`` is the hash of that reference (a rewritten file is another dataset).
The manifest is written last, so its presence means the dataset is whole.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
REFERENCE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CHUNK_POOL = "chunks/"


def pool_key(sha256: str) -> str:
    """Bucket key of a chunk in the content-addressed pool (format 2)."""
    return f"{CHUNK_POOL}{sha256}.arrow"


@dataclass(frozen=True)
class SourceRef:
    """Row groups [first, stop) of a parquet object, as it was when the dataset was made."""

    bucket: str
    key: str
    size: int
    etag: str
    row_groups: tuple[int, int]
    span: tuple[int, int]     # bytes [start, stop) of the file that hold those row groups
    tail: int                 # bytes of its footer: metadata, its length, PAR1

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def identity(self, arrow_schema: str) -> str:
        """The chunk's id: this reference and the schema its rows are read into."""
        body = json.dumps([asdict(self), arrow_schema], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class ChunkInfo:
    key: str          # format 2: key in the bucket; format 1: key relative to the dataset prefix;
                      # format 3: the source object's key
    rows: int
    nbytes: int       # format 3: estimated Arrow bytes of the rows (what a rank holds)
    sha256: str       # format 3: the reference's identity (the cache file's name)
    source: SourceRef | None = None


@dataclass(frozen=True)
class Manifest:
    dataset_hash: str
    schema: dict[str, str]            # column -> Arrow type string, in order
    chunks: tuple[ChunkInfo, ...]
    format_version: int = FORMAT_VERSION
    meta: dict = field(default_factory=dict)
    categories: dict[str, list] = field(default_factory=dict)   # categorical column -> categories (code = index)
    arrow_schema: str = ""            # format 3: base64 IPC schema the referenced rows are read into

    @property
    def referenced(self) -> bool:
        """True when the chunks are row groups of parquet objects read in place (format 3)."""
        return self.format_version == REFERENCE_VERSION

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    @property
    def columns(self) -> list[str]:
        return list(self.schema)

    def object_key(self, prefix: str, chunk: ChunkInfo) -> str:
        """Bucket key of ``chunk`` of the dataset stored under ``prefix`` (``datasets/<hash>/``)."""
        return prefix + chunk.key if self.format_version == 1 else chunk.key

    def to_json(self) -> str:
        d = asdict(self)
        d["chunks"] = [{k: v for k, v in asdict(c).items() if v is not None} for c in self.chunks]
        if not d["categories"]:   # a dataset without categoricals reads as it always did
            del d["categories"]
        if not self.arrow_schema:   # format 2 manifests stay exactly as older readers expect them
            del d["arrow_schema"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        d = json.loads(text)
        if d.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported manifest format_version {d.get('format_version')!r}")
        d["chunks"] = tuple(_chunk_from_dict(c) for c in d["chunks"])
        return cls(**d)


def _chunk_from_dict(c: dict) -> ChunkInfo:
    src = c.get("source")
    if src is not None:
        src = SourceRef(**{**src, "row_groups": tuple(src["row_groups"]), "span": tuple(src["span"])})
    return ChunkInfo(**{**c, "source": src})


def dataset_hash(schema: dict[str, str], chunk_hashes: list[str], categories: dict[str, list] | None = None) -> str:
    """Content address of a dataset: its schema, its chunks' hashes, in order, and its category mapping
    (the same codes under another mapping are other data; no mapping hashes as it always did)."""
    h = hashlib.sha256()
    h.update(json.dumps(list(schema.items())).encode())
    for c in chunk_hashes:
        h.update(c.encode())
    if categories:
        h.update(json.dumps(sorted(categories.items())).encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class ShardSlice:
    """Rows [offset, offset+length) of one chunk."""

    chunk: int
    offset: int
    length: int


def shard_bounds(num_rows: int, world_size: int, rank: int, equal: bool = False) -> tuple[int, int]:
    """Contiguous, row-balanced [start, stop) of ``rank``; sizes differ by at most one row
    (exactly equal when ``equal``: the remainder rows are dropped)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if equal:
        per = num_rows // world_size
        return rank * per, (rank + 1) * per
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def assign_shard(chunk_rows: list[int], world_size: int, rank: int, equal: bool = False) -> list[ShardSlice]:
    """The chunk slices that make up ``rank``'s contiguous shard."""
    start, stop = shard_bounds(sum(chunk_rows), world_size, rank, equal)
    out: list[ShardSlice] = []
    pos = 0
    for i, rows in enumerate(chunk_rows):
        lo, hi = max(start, pos), min(stop, pos + rows)
        if lo < hi:
            out.append(ShardSlice(i, lo - pos, hi - lo))
        pos += rows
        if pos >= stop:
            break
    return out
