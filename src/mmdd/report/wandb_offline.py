"""Read W&B offline runs (`offline-run-*/run-*.wandb`) without syncing them.

The .wandb file is a LevelDB-style log (7-byte file header ":W&B" + magic + version, 32 KiB blocks of
records with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of `wandb_internal_pb2.Record`
protobufs. The run's config arrives in its `run` record; metrics in `history` and `summary` records.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    """The raw protobuf payloads of a .wandb file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:  # zero padding: the rest of this block is empty
            pos += left - HEADER
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> tuple[str, dict, dict]:
    """(job type, config, metrics) of one offline run: job type and config from the run record, the last value of
    every metric."""
    from wandb.proto import wandb_internal_pb2 as pb

    job_type = ""
    config: dict = {}
    metrics: dict = {}
    for raw in read_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            job_type = rec.run.job_type or job_type
            config.update({it.key: json.loads(it.value_json) for it in rec.run.config.update})
        elif kind == "config":
            config.update({_key(it): json.loads(it.value_json) for it in rec.config.update})
        elif kind == "history":
            metrics.update({_key(it): json.loads(it.value_json) for it in rec.history.item})
        elif kind == "summary":
            metrics.update({_key(it): json.loads(it.value_json) for it in rec.summary.update})
    return job_type, config, metrics
