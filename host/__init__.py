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

__all__: list[str] = []
