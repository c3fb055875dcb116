"""toma-edge host SDK: training with TOMA memory policies, compression, ExecuTorch export,
``build``, and the fleet collector.

    from toma_edge.host import build
    result = build(target="rpi", out="dist/rpi4")    # the built-in example
    print(result.manifest["metrics"]["shipped"])

``build`` and ``compress_saved`` (``toma-edge compress``) are compositions of the steps in
:mod:`toma_edge.host.pipeline`; ``compress`` is the compression search
(:mod:`toma_edge.host.search`) over a trained model.
"""

if __name__ != "toma_edge.host":
    raise ImportError(
        f"the host SDK must be imported as toma_edge.host, not {__name__!r}; "
        "install the package (pip install -e .) and import toma_edge.host"
    )

__all__ = [
    "build",
    "BuildResult",
    "compress_saved",
    "package",
    "compress",
    "CompressResult",
    "prune_structured",
    "train_model",
    "TrainSpec",
    "MemoryPolicy",
    "export_program",
    "Collector",
    "FleetStore",
]

from .._lazy import lazy_getattr  # noqa: E402

# loaded on first use, so importing the package stays cheap (no torch)
_LAZY = {
    "build": "pipeline",
    "BuildResult": "pipeline",
    "compress_saved": "pipeline",
    "package": "pipeline",
    "compress": "search",
    "CompressResult": "search",
    "prune_structured": "prune",
    "train_model": "train",
    "TrainSpec": "train",
    "MemoryPolicy": "train",
    "export_program": "export",
    "Collector": "fleet.collector",
    "FleetStore": "fleet.store",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
