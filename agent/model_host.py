"""The active models, one per name, and the one door to them: `ModelHost.infer`, with hot swap
and latency recording.

    EdgeError
    ├── InstallError
    │   └── NoModelError          nothing is active yet, or not the name asked for (API: 503/404)
    │       └── UnknownModelError no active model has the name asked for (API: 404)
    ├── AmbiguousModelError       no name given and several models are active (API: 409)
    ├── InvalidInputError         feeds do not match the model's inputs (API: 400)
    └── InferenceFailedError      the runtime raised while running valid feeds (API: 500)

Swap is a reference replacement under a lock held for nanoseconds: a request takes the reference
it found and finishes on that model; requests that start after `swap` see the new one. Each model
name is swapped on its own, so installing, rolling back or removing one model never touches a
request on another. Each model counts its requests in flight, so the installer can `drain` the
old one before closing its session.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from agent.telemetry import LatencyRecorder, WindowContext
from edgesdk.errors import EdgeError, InstallError
from edgesdk.manifest import TensorSpec


class NoModelError(InstallError):
    """No model is active (first install not finished, or every install failed)."""


class UnknownModelError(NoModelError):
    """No active model has the name a request asked for."""


class AmbiguousModelError(EdgeError):
    """A request named no model and several are active."""


class InvalidInputError(EdgeError):
    """The feeds' names, dtypes or shapes do not fit the active model's inputs."""


class InferenceFailedError(EdgeError):
    """The runtime raised on feeds that passed validation."""


class SessionLike(Protocol):
    """What the host needs of a runtime session (edgesdk.runtime.Session satisfies it)."""

    input_names: Sequence[str]
    output_names: Sequence[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _specs(items: Iterable[TensorSpec | Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
    out = []
    for item in items:
        if isinstance(item, TensorSpec):
            out.append(item)
        else:
            try:
                out.append(TensorSpec(str(item["name"]), str(item["dtype"]), tuple(item["shape"])))
            except (KeyError, TypeError):
                raise InstallError(f"tensor spec {item!r} needs 'name', 'dtype' and 'shape'") from None
    return tuple(out)


@dataclass(frozen=True, eq=False)  # identity semantics: two loads of one package are two models
class ActiveModel:
    """A loaded, health-checked model and what it is; ``inputs``/``outputs`` also accept manifest dicts."""

    session: SessionLike
    package_id: str
    name: str
    version: str
    variant: str
    provider: str
    runtime: str
    inputs: tuple[TensorSpec, ...] = ()  # empty: names from the session, no dtype/shape checks
    outputs: tuple[TensorSpec, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. selection benchmark, for /v1/status

    def __post_init__(self) -> None:
        # Accept manifest dicts ({"name","dtype","shape"}) as well as TensorSpec records.
        object.__setattr__(self, "inputs", _specs(self.inputs))
        object.__setattr__(self, "outputs", _specs(self.outputs))

    @property
    def context(self) -> WindowContext:
        return WindowContext(package_id=self.package_id, variant=self.variant, provider=self.provider,
                             model=self.name)

    @property
    def release(self) -> str:
        """``name@version``, how users see a release."""
        return f"{self.name}@{self.version}"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for /v1/status."""
        def spec(s: TensorSpec) -> dict[str, Any]:
            return {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
        described = dict(self.extra)  # the fixed fields below win over a clashing extra key
        described.update({
            "package_id": self.package_id, "name": self.name, "version": self.version,
            "variant": self.variant, "provider": self.provider, "runtime": self.runtime,
            "inputs": [spec(s) for s in self.inputs] or [{"name": n} for n in self.session.input_names],
            "outputs": [spec(s) for s in self.outputs] or [{"name": n} for n in self.session.output_names],
        })
        return described


def _cast(name: str, arr: np.ndarray, want: np.dtype) -> np.ndarray:
    have = arr.dtype
    if have == want:
        return arr
    if want.kind == "f" and have.kind in "biuf":
        return arr.astype(want)  # JSON numbers arrive as float64/int64; narrowing floats is expected
    if want.kind in "iu" and have.kind in "biu":
        info = np.iinfo(want)
        if arr.size == 0 or (int(arr.min()) >= info.min and int(arr.max()) <= info.max):
            return arr.astype(want)
        raise InvalidInputError(f"input {name!r}: values outside the range of {want.name}")
    raise InvalidInputError(f"input {name!r} has dtype {have.name}; the model wants {want.name}")


def prepare_feeds(model: ActiveModel, feeds: Any) -> dict[str, np.ndarray]:
    """Check names, rank and fixed dims against the model's inputs and cast dtypes; InvalidInputError."""
    if not isinstance(feeds, Mapping):
        raise InvalidInputError("inputs must be an object of input name -> array")
    names = [s.name for s in model.inputs] or list(model.session.input_names)
    unknown = sorted(set(feeds) - set(names))
    if unknown:
        raise InvalidInputError(f"unknown input {unknown[0]!r}; the model's inputs are {', '.join(names)}")
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InvalidInputError(f"missing input {missing[0]!r}; the model's inputs are {', '.join(names)}")
    specs = {s.name: s for s in model.inputs}
    out: dict[str, np.ndarray] = {}
    for name in names:
        try:
            arr = np.asarray(feeds[name])
        except ValueError:  # ragged nested lists
            raise InvalidInputError(f"input {name!r} is not a rectangular array") from None
        if arr.dtype.kind not in "biuf":
            raise InvalidInputError(f"input {name!r} is not numeric (dtype {arr.dtype.name})")
        spec = specs.get(name)
        if spec is not None:
            if arr.ndim != len(spec.shape):
                raise InvalidInputError(
                    f"input {name!r} has rank {arr.ndim} (shape {list(arr.shape)}); the model wants "
                    f"rank {len(spec.shape)} {list(spec.shape)}")
            for axis, (got, dim) in enumerate(zip(arr.shape, spec.shape)):
                if isinstance(dim, int) and dim > 0 and got != dim:
                    raise InvalidInputError(
                        f"input {name!r} has shape {list(arr.shape)}; the model wants {list(spec.shape)} "
                        f"(axis {axis})")
            try:
                want = np.dtype(spec.dtype)
            except TypeError:  # a dtype name numpy lacks (e.g. bfloat16): let the runtime decide
                want = arr.dtype
            arr = _cast(name, arr, want)
        out[name] = arr
    return out


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    latency_ms: float  # session.run only, not validation
    model: ActiveModel


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ModelHost:
    """Holds the active models by name; every inference goes through `infer` and is timed into
    ``recorder`` under its model's window."""

    def __init__(self, recorder: LatencyRecorder, *, timer: Callable[[], float] = time.perf_counter) -> None:
        self.recorder = recorder
        self._timer = timer
        self._cond = threading.Condition(threading.Lock())
        self._models: dict[str, ActiveModel] = {}
        self._in_flight: dict[ActiveModel, int] = {}

    def models(self) -> dict[str, ActiveModel]:
        """The active models by name (a snapshot, sorted by name)."""
        with self._cond:
            return dict(sorted(self._models.items()))

    def get(self, name: str) -> ActiveModel | None:
        with self._cond:
            return self._models.get(name)

    @property
    def active(self) -> ActiveModel | None:
        """The active model when exactly one is active (what a request naming no model runs on)."""
        with self._cond:
            return next(iter(self._models.values())) if len(self._models) == 1 else None

    def swap(self, name: str, new: ActiveModel | None) -> ActiveModel | None:
        """Make ``new`` the model that requests for ``name`` use (None: unload ``name``); return the
        one it replaces (still serving its requests in flight: `drain` it before closing its session)."""
        if new is not None and new.name != name:
            raise InstallError(f"model {new.name!r} cannot serve as {name!r}")
        with self._cond:
            old = self._models.pop(name, None)
            if new is not None:
                self._models[name] = new
            return old

    def resolve(self, name: str | None = None) -> ActiveModel:
        """The model a request for ``name`` runs on; None: the only active one."""
        with self._cond:
            return self._resolve(name)

    def _resolve(self, name: str | None) -> ActiveModel:
        if name is not None:
            model = self._models.get(name)
            if model is None:
                known = ", ".join(sorted(self._models)) or "none"
                raise UnknownModelError(f"no active model named {name[:64]!r} (active: {known})")
            return model
        if not self._models:
            raise NoModelError("no model is active on this device yet")
        if len(self._models) > 1:
            raise AmbiguousModelError(f"{len(self._models)} models are active ({', '.join(sorted(self._models))}): "
                                      "name one, POST /v1/models/{name}/infer")
        return next(iter(self._models.values()))

    def in_flight(self, model: ActiveModel) -> int:
        with self._cond:
            return self._in_flight.get(model, 0)

    def drain(self, model: ActiveModel, timeout_s: float) -> bool:
        """Wait until no request is running on ``model``; False if some still are after ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: model not in self._in_flight, timeout=timeout_s)

    def infer(self, feeds: Mapping[str, Any], model: str | None = None) -> dict[str, np.ndarray]:
        return self.infer_timed(feeds, model).outputs

    def infer_timed(self, feeds: Mapping[str, Any], model: str | None = None) -> InferResult:
        """Validate ``feeds``, run model ``model`` (None: the only active one), record the latency
        (or the error) in that model's window."""
        with self._cond:
            active = self._resolve(model)
            self._in_flight[active] = self._in_flight.get(active, 0) + 1
        context = active.context
        try:
            try:
                prepared = prepare_feeds(active, feeds)
            except InvalidInputError:
                self.recorder.record_rejected(context)
                raise
            start = self._timer()
            try:
                outputs = active.session.run(prepared)
            except Exception as exc:  # runtimes raise their own types (ORT Fail, OpenVINO RuntimeError...)
                self.recorder.record((self._timer() - start) * 1000.0, ok=False, context=context)
                raise InferenceFailedError(f"{active.name} {active.variant} on {active.provider}: "
                                           f"{_one_line(exc)}") from exc
            latency_ms = (self._timer() - start) * 1000.0
            self.recorder.record(latency_ms, context=context, outputs=outputs)  # summarized within a budget
            return InferResult(outputs, latency_ms, active)
        finally:
            with self._cond:
                left = self._in_flight[active] - 1
                if left:
                    self._in_flight[active] = left
                else:
                    del self._in_flight[active]
                    self._cond.notify_all()
