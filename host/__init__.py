"""toma-edge host SDK: training with TOMA memory policies, compression, ExecuTorch export,
``build``, and the fleet collector.

    from toma_edge.host.build import build
    result = build(target="rpi", out="dist/rpi4")    # the built-in example
    print(result.manifest["metrics"]["shipped"])
"""

if __name__ != "toma_edge.host":
    raise ImportError(
        f"the host SDK must be imported as toma_edge.host, not {__name__!r}; "
        "install the package (pip install -e .) and import toma_edge.host"
    )

__all__ = [
    "build",
    "BuildResult",
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

# loaded on first use, so importing the package stays cheap (no torch)
_LAZY = {
    "build": "build",
    "BuildResult": "build",
    "compress": "compress",
    "CompressResult": "compress",
    "prune_structured": "prune",
    "train_model": "train",
    "TrainSpec": "train",
    "MemoryPolicy": "train",
    "export_program": "export",
    "Collector": "fleet.collector",
    "FleetStore": "fleet.store",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toma_edge.host' has no attribute {name!r}")
