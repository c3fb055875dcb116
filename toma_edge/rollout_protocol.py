"""Fleet rollout wire protocol: job documents, job/chunk topics, event kinds, chunking.

    from toma_edge.rollout_protocol import JobDocument, chunk_archive, publish_job, decode_job
    parts = chunk_archive("dist/rpi4.tar.gz", 128 * 1024)      # BundleRef + list of chunks
    job = JobDocument(rollout_id="r-0001", action="install", bundle=parts.bundle,
                      release={"name": "digits", "version": "1.1"}, deadline=time.time() + 3600)
    publish_job(client, "plant-7", "pi-0042", job, parts)      # deployer's connection, retained
    decode_job(job.encode())                                    # the device's strict parse

Shared by the device (``serve --mqtt`` runs the job; toma_edge.device.jobs) and the
controller (``toma-edge fleet deploy``). Topics live under the device's tree
(``toma-edge/v1/<fleet>/<device>/jobs/...``); the shipped broker ACL lets only the deployer
identity write there and each device read only its own:

- ``.../jobs/<rollout_id>``: the :class:`JobDocument` (JSON, QoS 1, retained);
- ``.../jobs/<rollout_id>/chunk/<n>``: bytes ``n*chunk_bytes ...`` of the bundle archive
  (raw, QoS 1, retained; n is 0-based). A chunk is at most :data:`MAX_CHUNK_BYTES` (the
  broker's packet limit is 256 KiB). The job lists every chunk's sha256, so a device keeps
  the chunks it already holds after a restart and verifies every one it receives.

An empty retained payload on either topic clears it (:func:`clear_job`; the controller
does so once a device reached a final state). The device reports each state as an event
(``EventMessage`` on its events topic) of kind ``rollout.<state>`` (:data:`EVENT_KINDS`),
with the fields ``rollout_id``, ``version``, ``sha256`` and per state those listed in
docs/architecture.md ("Fleet rollout") (refused: ``reason`` and, for a misfit, ``need_bytes``,
``budget_bytes``, ``peak_bytes``, ``baseline_bytes``). No torch, no paho import here.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import BundleError, ConfigError, InputError, TelemetryError
from .jsonio import loads
from .telemetry import TOPIC_ROOT, validate_id

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_JOB_BYTES",
    "MAX_CHUNKS",
    "MAX_BUNDLE_BYTES",
    "RECEIVED",
    "DOWNLOADED",
    "VERIFIED",
    "REFUSED",
    "LIVE",
    "HEALTHY",
    "FAILED",
    "ROLLED_BACK",
    "EVENT_KINDS",
    "FINAL_KINDS",
    "BundleRef",
    "ReleaseRef",
    "JobDocument",
    "ArchiveChunks",
    "decode_job",
    "job_topic",
    "chunk_topic",
    "jobs_subscription",
    "chunks_subscription",
    "parse_job_topic",
    "chunk_archive",
    "publish_job",
    "clear_job",
    "event_fields",
]

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_BYTES = 128 * 1024
MAX_CHUNK_BYTES = 128 * 1024
"""Largest chunk, bytes (the shipped broker refuses packets over 256 KiB)."""
MAX_JOB_BYTES = 240 * 1024
"""Largest job document, bytes: it lists one sha256 per chunk, so a bundle sent over MQTT
holds at most :data:`MAX_CHUNKS` chunks (~400 MiB at 128 KiB); larger ones go by URL."""
MAX_CHUNKS = 3400
MAX_BUNDLE_BYTES = 4 << 30
"""Largest bundle archive a job may announce, bytes (4 GiB)."""

RECEIVED = "rollout.received"
DOWNLOADED = "rollout.downloaded"
VERIFIED = "rollout.verified"
REFUSED = "rollout.refused"
LIVE = "rollout.live"
HEALTHY = "rollout.healthy"
FAILED = "rollout.failed"
ROLLED_BACK = "rollout.rolled_back"
EVENT_KINDS = (RECEIVED, DOWNLOADED, VERIFIED, REFUSED, LIVE, HEALTHY, FAILED, ROLLED_BACK)
"""Every event kind a device reports during a rollout, in the order they can happen."""
FINAL_KINDS = frozenset({REFUSED, HEALTHY, ROLLED_BACK})
"""States after which a device does nothing more for that rollout (``failed`` is always
followed by ``rolled_back``)."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Sha = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_Name = Annotated[str, StringConstraints(min_length=1, max_length=200,
                                         pattern=r"^[^\x00-\x1f\x7f]+$")]
_Strict = ConfigDict(frozen=True, extra="forbid", strict=True)


class BundleRef(BaseModel):
    """The bundle archive a job installs: its sha256 and size, and how to get it (chunks
    on the job's chunk topics, or ``url``: HTTP(S), then ``chunks`` is 0)."""

    model_config = _Strict
    sha256: _Sha
    bytes: int = Field(ge=1, le=MAX_BUNDLE_BYTES)
    chunks: int = Field(ge=0, le=MAX_CHUNKS)
    chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=1024, le=MAX_CHUNK_BYTES)
    chunk_sha256: list[_Sha] = Field(default_factory=list, max_length=MAX_CHUNKS)
    url: Annotated[str, StringConstraints(max_length=2048,
                                          pattern=r"^https?://[^\s\x00-\x1f]+$")] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BundleRef:
        if self.url is None:
            want = math.ceil(self.bytes / self.chunk_bytes)
            if self.chunks != want:
                raise ValueError(f"{self.bytes} bytes in chunks of {self.chunk_bytes} are "
                                 f"{want} chunks, not {self.chunks}")
        elif self.chunks != 0:
            raise ValueError("a bundle fetched from its url has chunks 0")
        if len(self.chunk_sha256) != self.chunks:
            raise ValueError(f"chunk_sha256 lists {len(self.chunk_sha256)} hashes for "
                             f"{self.chunks} chunks")
        return self

    def chunk_size(self, n: int) -> int:
        """Bytes in chunk ``n`` (the last one may be shorter)."""
        return min(self.chunk_bytes, self.bytes - n * self.chunk_bytes)


class ReleaseRef(BaseModel):
    """Name and version of the bundle a job installs (from its manifest)."""

    model_config = _Strict
    name: _Name
    version: _Name


class JobDocument(BaseModel):
    """One device's part of a rollout (strict: unknown keys, ``"3"`` for 3, ``true`` for
    a number are refused). ``action="rollback"`` needs no bundle: the device goes back
    to its previous release. Times in seconds; ``deadline`` is unix time."""

    model_config = _Strict
    v: Literal[1] = 1
    rollout_id: Annotated[str, StringConstraints(pattern=_ID_RE.pattern)]
    action: Literal["install", "rollback"]
    bundle: BundleRef | None = None
    release: ReleaseRef | None = None
    allow_contract_change: bool = False
    health_window_s: float = Field(default=60.0, ge=0, le=7 * 86400)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_p99_ratio: float = Field(default=3.0, ge=1, le=1e6)
    crash_limit: int = Field(default=2, ge=1, le=100)
    deadline: float = Field(ge=0, le=1e11)

    @field_validator("v", mode="before")
    @classmethod
    def _version_is_int(cls, v: Any) -> Any:
        if type(v) is not int:
            raise ValueError(f"protocol version must be the integer {PROTOCOL_VERSION}")
        return v

    @field_validator("health_window_s", "max_error_rate", "max_p99_ratio", "deadline",
                     mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a JSON number")
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return float(v)

    @model_validator(mode="after")
    def _needs_bundle(self) -> JobDocument:
        if self.action == "install" and (self.bundle is None or self.release is None):
            raise ValueError("an install job needs 'bundle' and 'release'")
        return self

    def encode(self) -> bytes:
        """UTF-8 JSON bytes of this job (compact)."""
        return self.model_dump_json().encode()

    def expired(self, now: float | None = None) -> bool:
        """Whether the rollout's deadline has passed (a device ignores the job then)."""
        return (time.time() if now is None else now) > self.deadline


def decode_job(payload: bytes | str) -> JobDocument:
    """Parse one job payload strictly; InputError with one line naming the problem."""
    if len(payload) > MAX_JOB_BYTES:
        raise InputError(f"job document of {len(payload)} bytes is over {MAX_JOB_BYTES} bytes")
    data = loads(payload, max_depth=4, what="job document")
    if not isinstance(data, dict):
        raise InputError("job document must be a JSON object")
    if "v" not in data:
        raise InputError(f"job document has no protocol version 'v' (this device reads "
                         f"v={PROTOCOL_VERSION})")
    try:
        return JobDocument.model_validate(data, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "job"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise InputError(f"job document is invalid: {loc}: {err['msg']}{more}"
                         .replace("\n", " ")[:300]) from e


# --------------------------------------------------------------------------- topics


def _device_root(fleet: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/{validate_id(fleet, what='fleet')}/{validate_id(device_id)}/jobs"


def job_topic(fleet: str, device_id: str, rollout_id: str) -> str:
    """``toma-edge/v1/<fleet>/<device>/jobs/<rollout_id>`` (the retained job document)."""
    return f"{_device_root(fleet, device_id)}/{validate_id(rollout_id, what='rollout id')}"


def chunk_topic(fleet: str, device_id: str, rollout_id: str, n: int) -> str:
    """``.../jobs/<rollout_id>/chunk/<n>`` (retained raw bytes of chunk ``n``, 0-based)."""
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"chunk number {n!r} must be an integer >= 0")
    return f"{job_topic(fleet, device_id, rollout_id)}/chunk/{n}"


def jobs_subscription(fleet: str, device_id: str) -> str:
    """The filter a device subscribes to for its job documents (``.../jobs/+``)."""
    return f"{_device_root(fleet, device_id)}/+"


def chunks_subscription(fleet: str, device_id: str, rollout_id: str) -> str:
    """The filter for one rollout's chunks (subscribing again replays the retained ones)."""
    return f"{job_topic(fleet, device_id, rollout_id)}/chunk/+"


def parse_job_topic(name: str) -> tuple[str, str, str, int | None]:
    """``(fleet, device, rollout_id, chunk)`` of a job (chunk None) or chunk topic;
    TelemetryError if ``name`` is neither."""
    parts = name.split("/")
    ok = (
        len(parts) in (6, 8)
        and "/".join(parts[:2]) == TOPIC_ROOT
        and parts[4] == "jobs"
        and all(_ID_RE.match(p) for p in (parts[2], parts[3], parts[5]))
    )
    chunk: int | None = None
    if ok and len(parts) == 8:
        ok = parts[6] == "chunk" and parts[7].isdigit() and len(parts[7]) <= 6
        chunk = int(parts[7]) if ok else None
    if not ok:
        raise TelemetryError(f"topic {name[:200]!r} is not "
                             "toma-edge/v1/<fleet>/<device>/jobs/<rollout_id>[/chunk/<n>]")
    return parts[2], parts[3], parts[5], chunk


# --------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class ArchiveChunks:
    """A bundle archive cut into chunks: the :class:`BundleRef` a job carries and the bytes."""

    bundle: BundleRef
    chunks: list[bytes]


def chunk_archive(path: str | Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ArchiveChunks:
    """Read the archive at ``path`` (a ``.tar.gz`` from ``toma_edge.bundle.make_archive``)
    and cut it into chunks of ``chunk_bytes`` bytes with their sha256; BundleError if it
    is missing, empty or too large for MQTT (:data:`MAX_CHUNKS`)."""
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"bundle archive {str(p)!r} does not exist or is not a file")
    if not 1024 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"chunk size {chunk_bytes} must be 1024..{MAX_CHUNK_BYTES} bytes")
    data = p.read_bytes()
    if not data:
        raise BundleError(f"bundle archive {str(p)!r} is empty")
    chunks = [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    if len(chunks) > MAX_CHUNKS:
        raise BundleError(f"bundle archive {str(p)!r} of {len(data)} bytes needs "
                          f"{len(chunks)} chunks (at most {MAX_CHUNKS}); serve it by URL")
    ref = BundleRef(
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), chunks=len(chunks),
        chunk_bytes=chunk_bytes, chunk_sha256=[hashlib.sha256(c).hexdigest() for c in chunks],
    )
    return ArchiveChunks(bundle=ref, chunks=chunks)


def publish_job(client: Any, fleet: str, device_id: str, job: JobDocument,
                parts: ArchiveChunks | None = None, *, timeout_s: float = 60.0) -> None:
    """Publish ``job`` for one device (retained, QoS 1) on a connected paho client of the
    deployer identity: the chunks first (when ``parts`` is given and the job carries no
    url), then the job document. Waits until the broker acknowledged every message;
    TelemetryError after ``timeout_s`` seconds or when the broker refuses one."""
    if parts is not None and job.bundle is not None and job.bundle.url is None:
        if parts.bundle.sha256 != job.bundle.sha256:
            raise ConfigError("the chunks are not those of the job's bundle (sha256 differs)")
    infos = []
    if parts is not None and job.bundle is not None and job.bundle.url is None:
        for n, chunk in enumerate(parts.chunks):
            infos.append(client.publish(chunk_topic(fleet, device_id, job.rollout_id, n),
                                        chunk, qos=1, retain=True))
    infos.append(client.publish(job_topic(fleet, device_id, job.rollout_id), job.encode(),
                                qos=1, retain=True))
    _wait(infos, timeout_s)


def clear_job(client: Any, fleet: str, device_id: str, rollout_id: str, chunks: int,
              *, timeout_s: float = 60.0) -> None:
    """Clear a device's retained job document and its ``chunks`` chunks (empty payloads)."""
    infos = [client.publish(job_topic(fleet, device_id, rollout_id), b"", qos=1, retain=True)]
    for n in range(chunks):
        infos.append(client.publish(chunk_topic(fleet, device_id, rollout_id, n), b"",
                                    qos=1, retain=True))
    _wait(infos, timeout_s)


def _wait(infos: list[Any], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    for info in infos:
        if info.rc != 0:
            raise TelemetryError(f"publishing a job message failed (paho rc {info.rc})")
        left = end - time.monotonic()
        if left <= 0 or not _wait_one(info, left):
            raise TelemetryError(f"the broker did not acknowledge the job within {timeout_s} s")


def _wait_one(info: Any, timeout_s: float) -> bool:
    try:
        info.wait_for_publish(timeout=timeout_s)
    except (RuntimeError, ValueError) as e:  # not connected / queue full
        raise TelemetryError(f"publishing a job message failed: {e}") from e
    return bool(info.is_published())


def event_fields(job: JobDocument, **extra: Any) -> dict[str, Any]:
    """The fields of a ``rollout.*`` event about ``job`` (rollout_id, version, sha256,
    then ``extra``: reason, figures...)."""
    fields: dict[str, Any] = {
        "rollout_id": job.rollout_id,
        "version": job.release.version if job.release else None,
        "sha256": job.bundle.sha256 if job.bundle else None,
    }
    fields.update(extra)
    return fields
