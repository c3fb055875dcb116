"""The bundle format, shared by host and device: the manifest's typed models, checks,
the writer, archives and inspection. No torch here, and no host or device import.

    from toma_edge.bundle import verify_bundle, read_manifest
    vb = verify_bundle("dist/rpi4", trust_key="fleet.pub")   # BundleError says which check failed
    vb.manifest.name, vb.manifest.metrics.shipped["test_r2"], vb.model_path

Modules: :mod:`.manifest` (the models; the host writes them, the device reads them),
:mod:`.verify` (hashes, signature, executorch version), :mod:`.writer` (temporary folder,
hashes, signature, atomic rename, archive), :mod:`.archive` (``make_archive``, the
hardened ``extract_archive``), :mod:`.inspect` (``toma-edge inspect``'s summary).
"""

from .archive import (
    MAX_MEMBERS,
    MAX_RATIO,
    ArchiveLimits,
    archive_limits,
    extract_archive,
    make_archive,
)
from .inspect import RuntimeInfo, describe
from .manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    BuildInfo,
    CandidateEntry,
    DataInfo,
    FileEntry,
    Manifest,
    Memory,
    Metrics,
    TargetInfo,
    TensorSpec,
    parse_manifest,
    read_manifest,
    sha256_file,
)
from .verify import VerifiedBundle, major_minor, sign_manifest, verify_bundle
from .writer import BundleWriter, WrittenBundle

__all__ = [
    "MAX_MEMBERS",
    "MAX_RATIO",
    "ArchiveLimits",
    "archive_limits",
    "extract_archive",
    "make_archive",
    "RuntimeInfo",
    "describe",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "BuildInfo",
    "CandidateEntry",
    "DataInfo",
    "FileEntry",
    "Manifest",
    "Memory",
    "Metrics",
    "TargetInfo",
    "TensorSpec",
    "parse_manifest",
    "read_manifest",
    "sha256_file",
    "VerifiedBundle",
    "major_minor",
    "sign_manifest",
    "verify_bundle",
    "BundleWriter",
    "WrittenBundle",
]
