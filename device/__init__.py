"""toma-edge device runtime: bundle loading, memory-budgeted inference, streaming loaders,
the inference service and the telemetry agent. Never imports ``toma_edge.host``.

    from toma_edge.device.bundle import load_bundle
    bundle = load_bundle("dist/rpi4")                # checks schema, versions, sha256
    print(bundle.manifest.name, bundle.manifest.max_batch)
"""

if __name__ != "toma_edge.device":
    raise ImportError(
        f"the device runtime must be imported as toma_edge.device, not {__name__!r}; "
        "install the package (pip install -e .) and import toma_edge.device"
    )

__all__: list[str] = []
