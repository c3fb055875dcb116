"""The served model and its safe replacement: verify, warm up beside the old one, swap.

    from toma_edge.device.service.models import ModelHolder
    holder = ModelHolder.open("/var/lib/toma-edge/current", budget="512MiB", trust_key="fleet.pub")
    holder.current.name, holder.current.version, holder.current.sha256
    holder.replace("/tmp/upload.tar.gz")        # BundleError/BudgetError: the old model keeps serving

A replacement is loaded with :func:`~toma_edge.device.bundle.load_bundle` (schema, versions,
every sha256, the signature when a trust key is set), wrapped in a
:class:`~toma_edge.device.predictor.Predictor` (which refuses a model that does not fit
the memory budget beside the one still serving) and run once at batch 1 and at its batch
size; only then does :attr:`ModelHolder.current` change, in one reference assignment.
Batches already running finish on the old model, the next ones use the new one, so no
request fails. The old model is freed once its last batch is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import BundleError, TomaEdgeError
from ..bundle import load_bundle
from ..predictor import Predictor

__all__ = ["ServedModel", "ModelHolder", "SwapInProgress", "SwapHook"]

log = logging.getLogger("toma_edge.service")


class SwapInProgress(TomaEdgeError):
    """Another model update is being loaded; try again when it is done."""


@dataclass(frozen=True)
class ServedModel:
    """One loaded, warmed-up model and where it came from."""

    predictor: Predictor
    source: str
    loaded_at: float

    @property
    def name(self) -> str:
        """The manifest's model name."""
        return self.predictor.manifest.name

    @property
    def version(self) -> str:
        """The manifest's model version."""
        return self.predictor.manifest.version

    @property
    def sha256(self) -> str:
        """sha256 of the bundle's manifest.json (hex): which exact bundle is serving."""
        return self.predictor.bundle.manifest_sha256

    @property
    def signed(self) -> bool:
        """Whether the bundle carried a valid signature."""
        return self.predictor.bundle.signed

    @property
    def batch_dependent(self) -> bool:
        """True when rows of one call influence each other (never mix requests then)."""
        return self.predictor.manifest.batch_dependent

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one input row."""
        return self.predictor.input_spec.row_shape

    def describe(self) -> dict[str, object]:
        """What /healthz shows about the model."""
        m = self.predictor.manifest
        return {
            "name": m.name, "version": m.version, "sha256": self.sha256, "task": m.task,
            "signed": self.signed, "source": self.source, "loaded_at": self.loaded_at,
            "input_shape": list(m.inputs[0].shape), "batch_size": self.predictor.batch_size,
            "batch_dependent": m.batch_dependent, "adapter": self.predictor.bundle.adapter,
        }


SwapHook = Callable[[ServedModel, "ServedModel | None"], None]
"""Called with ``(new, old)`` after a model went live (``old`` None for the first)."""


def _warm_up(p: Predictor) -> None:
    """Run the model at batch 1 and at its batch size; BundleError if it fails or answers
    non-finite values (a model that cannot answer zeros will not answer clients)."""
    for n in sorted({1, p.batch_size}):
        try:
            out = p.predict(np.zeros((n, *p.input_spec.row_shape), dtype=np.float32)).outputs
        except TomaEdgeError:
            raise
        except Exception as e:  # noqa: BLE001 - any runtime failure refuses the bundle
            raise BundleError(f"{p.manifest.name}: the model fails at batch {n}: {e}") from e
        if out.shape[0] != n or not np.isfinite(out).all():
            raise BundleError(
                f"{p.manifest.name}: warm-up at batch {n} gave {out.shape[0]} rows with "
                "non-finite values; rebuild the bundle"
            )


class ModelHolder:
    """Holds the serving model and replaces it safely. See the module docstring.

    ``budget``, ``threads``, ``trust_key``: as for :class:`Predictor` and
    :func:`load_bundle`, applied to every model this holder loads.
    """

    def __init__(
        self,
        *,
        budget: int | str | None = None,
        threads: int | None = None,
        trust_key: str | Path | None = None,
        on_swap: SwapHook | None = None,
    ) -> None:
        self.budget = budget
        self.threads = threads
        self.trust_key = trust_key
        self.on_swap = on_swap
        self._current: ServedModel | None = None
        self._swap_lock = threading.Lock()
        #: model updates that went live / were refused
        self.swaps = 0
        self.refused = 0

    @classmethod
    def open(cls, source: str | Path, **kw: object) -> ModelHolder:
        """A holder serving the bundle at ``source`` (folder or .tar.gz)."""
        h = cls(**kw)  # type: ignore[arg-type]
        h.replace(source)
        return h

    @property
    def current(self) -> ServedModel:
        """The model serving now (one attribute read: atomic)."""
        m = self._current
        if m is None:
            raise BundleError("no model is loaded yet")
        return m

    def load(self, source: str | Path) -> ServedModel:
        """Verify, load and warm up the bundle at ``source`` without serving it."""
        t0 = time.perf_counter()
        b = load_bundle(source, trust_key=self.trust_key, threads=self.threads)
        p = Predictor(b, budget=self.budget)
        _warm_up(p)
        log.info("loaded %s %s from %s in %.2f s (batch %d rows, %s)", p.manifest.name,
                 p.manifest.version, source, time.perf_counter() - t0, p.batch_size,
                 "signed" if b.signed else "unsigned")
        return ServedModel(predictor=p, source=str(source), loaded_at=time.time())

    def replace(self, source: str | Path) -> ServedModel:
        """Load ``source`` beside the serving model, then make it the serving one.

        Raises BundleError/BudgetError/ConfigError (nothing changes then) or
        :class:`SwapInProgress` if another update is loading.
        """
        if not self._swap_lock.acquire(blocking=False):
            raise SwapInProgress("another model update is in progress; retry when it is done")
        try:
            try:
                new = self.load(source)
            except TomaEdgeError:
                self.refused += 1
                raise
            except Exception as e:  # noqa: BLE001 - e.g. the runtime refusing the program
                self.refused += 1
                raise BundleError(f"{source}: the bundle cannot be loaded: {e}") from e
            old, self._current = self._current, new
            if old is not None:
                self.swaps += 1
                log.info("now serving %s %s (was %s %s)", new.name, new.version,
                         old.name, old.version)
            if self.on_swap is not None:
                self.on_swap(new, old)
            return new
        finally:
            self._swap_lock.release()
