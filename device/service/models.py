"""The served model and its safe replacement: verify, warm up beside the old one, swap.

    from toma_edge.device.service.models import ModelHolder
    holder = ModelHolder.open("/var/lib/toma-edge/current", budget="512MiB", trust_key="fleet.pub")
    holder.current.name, holder.current.version, holder.current.sha256
    holder.replace("/tmp/upload.tar.gz")    # BundleError/BudgetError: the old model serves on
    holder.replace(folder, allow_contract_change=False)   # ContractChanged if rows/answers differ
    holder.close()                              # drop the model (native objects released)

A replacement is loaded with :func:`~toma_edge.device.bundle.load_bundle` (schema, versions,
every sha256, the signature when a trust key is set), wrapped in a
:class:`~toma_edge.device.predictor.Predictor` (which refuses a model that does not fit
the memory budget beside the one still serving) and run once at batch 1 and at its batch
size; only then does :attr:`ModelHolder.current` change, in one reference assignment.
Batches already running finish on the old model, the next ones use the new one, so no
request fails. The old model is freed once its last batch is done.

A model's *contract* is what its clients rely on: the row shape and dtype of each input
and output (beyond the batch axis), the task and the class labels.
:func:`contract_difference` names the first difference; ``replace(...,
allow_contract_change=False)`` refuses such a model with :class:`ContractChanged` before
anything switches (uploads use it; an operator's SIGHUP does not).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...bundle import MANIFEST_NAME, Manifest, read_manifest
from ...errors import BundleError, TomaEdgeError
from ..bundle import load_bundle
from ..predictor import Predictor

__all__ = ["ServedModel", "ModelHolder", "SwapInProgress", "SwapHook", "ContractChanged",
           "contract_difference"]

log = logging.getLogger("toma_edge.service")


class SwapInProgress(TomaEdgeError):
    """Another model update is being loaded; try again when it is done."""


class ContractChanged(BundleError):
    """The new model takes or answers something else than the serving one (HTTP 409)."""


def contract_difference(old: Manifest, new: Manifest) -> str | None:
    """The first difference clients would notice between two models (one line), or None:
    the number, row shapes (beyond the batch axis) and dtypes of inputs and outputs, the
    task and the class labels. Names, versions and compression may differ."""
    for kind, a, b in (("input", old.inputs, new.inputs), ("output", old.outputs, new.outputs)):
        if len(a) != len(b):
            return f"{len(b)} {kind}s instead of {len(a)}"
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            if x.row_shape != y.row_shape:
                return (f"{kind} {k} ('{y.name}') rows have shape {list(y.row_shape)} instead of "
                        f"{list(x.row_shape)}")
            if x.dtype != y.dtype:
                return f"{kind} {k} ('{y.name}') has dtype {y.dtype} instead of {x.dtype}"
    if old.task != new.task:
        return f"task {new.task} instead of {old.task}"
    if old.classes != new.classes:
        def show(c: tuple[str, ...] | None) -> str:
            return "none" if c is None else str(list(c))[:80]
        return f"classes {show(new.classes)} instead of {show(old.classes)}"
    return None


def release_predictor(p: Predictor) -> None:
    """Free a Predictor's native program now (the adapter's ``close()``; a no-op where it
    has none), so nothing native is left for interpreter exit to report as leaked. Any
    later call on that Predictor raises BundleError."""
    close = getattr(getattr(p, "program", None), "close", None)
    if callable(close):
        try:
            close()
        except Exception as e:  # noqa: BLE001 - best effort at shutdown
            log.debug("releasing the program failed: %s", e)


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

    def load(self, source: str | Path, *, label: str | None = None,
             isolate: bool = False) -> ServedModel:
        """Verify, load and warm up the bundle at ``source`` without serving it
        (``label``: what :attr:`ServedModel.source` says, default ``source``; ``isolate``:
        run the program once in a child process first, so a crafted program that crashes
        the runtime is refused instead of killing the service)."""
        t0 = time.perf_counter()
        b = load_bundle(source, trust_key=self.trust_key, threads=self.threads,
                        isolate=isolate)
        p = Predictor(b, budget=self.budget)
        _warm_up(p)
        log.info("loaded %s %s from %s in %.2f s (batch %d rows, %s)", p.manifest.name,
                 p.manifest.version, source, time.perf_counter() - t0, p.batch_size,
                 "signed" if b.signed else "unsigned")
        return ServedModel(predictor=p, source=label or str(source), loaded_at=time.time())

    def replace(self, source: str | Path, *, allow_contract_change: bool = True,
                label: str | None = None) -> ServedModel:
        """Load ``source`` beside the serving model, then make it the serving one.

        Raises BundleError/BudgetError/ConfigError (nothing changes then),
        :class:`ContractChanged` when ``allow_contract_change`` is False and the model's
        contract differs from the serving one's, or :class:`SwapInProgress` if another
        update is loading. ``label``: the source recorded for /healthz.
        """
        if not self._swap_lock.acquire(blocking=False):
            raise SwapInProgress("another model update is in progress; retry when it is done")
        try:
            old = self._current
            if not allow_contract_change and old is not None and Path(source).is_dir():
                # a folder's manifest is read before loading anything (verified again by load)
                self._check_contract(old, read_manifest(Path(source) / MANIFEST_NAME))
            try:
                # a replacement nobody signed for us may be crafted: probe it in a child
                new = self.load(source, label=label, isolate=self.trust_key is None)
            except TomaEdgeError:
                self.refused += 1
                raise
            except Exception as e:  # noqa: BLE001 - e.g. the runtime refusing the program
                self.refused += 1
                raise BundleError(f"{source}: the bundle cannot be loaded: {e}") from e
            if not allow_contract_change and old is not None:
                try:
                    self._check_contract(old, new.predictor.manifest)
                except ContractChanged:
                    release_predictor(new.predictor)
                    raise
            self._current = new
            if old is not None:
                self.swaps += 1
                log.info("now serving %s %s (was %s %s)", new.name, new.version,
                         old.name, old.version)
            if self.on_swap is not None:
                self.on_swap(new, old)
            return new
        finally:
            self._swap_lock.release()

    def _check_contract(self, old: ServedModel, new: Manifest) -> None:
        diff = contract_difference(old.predictor.manifest, new)
        if diff is not None:
            self.refused += 1
            raise ContractChanged(
                f"{new.name} {new.version} changes the contract clients rely on: {diff} "
                f"(serving {old.name} {old.version}); resend with ?allow_contract_change=true "
                "to switch anyway")

    def close(self) -> None:
        """Stop serving: drop the model and release its native program (at shutdown)."""
        with self._swap_lock:
            old, self._current = self._current, None
        if old is not None:
            release_predictor(old.predictor)
