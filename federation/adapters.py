"""The adapter format shared by the federation modules: LoRA factors and head weights in numpy.

An :class:`AdapterState` holds, for each adapted ``(layer, module)`` pair, the LoRA factors
``A`` (``r x in_features``) and ``B`` (``out_features x r``) exactly as PEFT stores them in
``lora_A.weight`` and ``lora_B.weight``, plus the trained classification head. The server
keeps one global state at rank ``r_max`` for every layer and target module
(:func:`init_global`); each device receives a slice of it (:func:`slice_for`: the first
``r`` rows of ``A`` and columns of ``B`` of each planned layer, as in HetLoRA) and returns a
:class:`ClientUpdate`. :func:`check_update` lists every problem of an update against the
device's plan before it reaches an aggregation rule (:mod:`legend.federation.aggregation`).

Everything here is numpy; the conversion from and to a PEFT model lives in
:mod:`legend.federation.apply`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from legend.federation.errors import FederationInputError
from legend.models.spec import ModelSpec

__all__ = [
    "FORMAT_VERSION",
    "AdapterInputError",
    "AdapterState",
    "ClientUpdate",
    "Key",
    "check_update",
    "init_global",
    "slice_for",
]

Key = tuple[int, str]
"""``(layer, module)``: layer index ``0..L-1`` and module name from ``ModelSpec.target_modules``."""

FORMAT_VERSION = 1
"""Version of the ``.npz`` checkpoint layout written by :meth:`AdapterState.to_npz`."""

_INDEX_KEY = "__legend_adapter_index__"


class AdapterInputError(FederationInputError):
    """An adapter state, a slice request or a checkpoint that cannot be used."""


def _as_float32(value: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise AdapterInputError(
            f"{what} must be a numeric array, got {type(value).__name__}: {exc}"
        ) from None
    return array


def _key_text(key: Key) -> str:
    return f"layer {key[0]} `{key[1]}`"


@dataclass(frozen=True, kw_only=True, eq=False)
class AdapterState:
    """LoRA factors and head weights, numpy ``float32``.

    ``factors[(layer, module)] = (A, B)`` with ``A`` of shape ``(r, in_features)`` and ``B`` of
    shape ``(out_features, r)`` (PEFT's ``lora_A.weight`` and ``lora_B.weight``).
    ``head[name]`` holds the ``modules_to_save`` head with the ``base_model.model.`` prefix
    and the adapter-name parts removed, e.g. ``"classifier.weight"``, ``"classifier.bias"``
    (BERT), ``"classifier.dense.weight"`` (RoBERTa), ``"score.weight"`` (Llama).

    Construction converts every array to ``float32`` (no copy when it already is) and checks
    that keys are ``(int, str)`` and that factors are two-dimensional; whether the shapes
    agree with a plan and whether the values are finite is :func:`check_update`'s job, so
    that a bad client update can be reported instead of aborting a round.

    Equality is identity (arrays have no single truth value); compare with :meth:`equals`.
    """

    factors: Mapping[Key, tuple[np.ndarray, np.ndarray]]
    head: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        factors: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
        for key, pair in self.factors.items():
            if (
                not isinstance(key, tuple)
                or len(key) != 2
                or not isinstance(key[0], (int, np.integer))
                or isinstance(key[0], bool)
                or not isinstance(key[1], str)
            ):
                raise AdapterInputError(
                    f"factor keys must be (layer: int, module: str) tuples, got {key!r}"
                )
            if key[0] < 0:
                raise AdapterInputError(f"layer index must be >= 0, got {key[0]} in key {key!r}")
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise AdapterInputError(
                    f"factors[{key!r}] must be a pair (A, B), got {type(pair).__name__}"
                )
            a = _as_float32(pair[0], f"A of {_key_text(key)}")
            b = _as_float32(pair[1], f"B of {_key_text(key)}")
            if a.ndim != 2 or b.ndim != 2:
                raise AdapterInputError(
                    f"A and B of {_key_text(key)} must be 2-D (r x in, out x r), "
                    f"got shapes {a.shape} and {b.shape}"
                )
            factors[(int(key[0]), key[1])] = (a, b)
        head: dict[str, np.ndarray] = {}
        for name, value in self.head.items():
            if not isinstance(name, str) or not name:
                raise AdapterInputError(f"head names must be non-empty strings, got {name!r}")
            head[name] = _as_float32(value, f"head weight {name!r}")
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "head", head)

    # -- views --------------------------------------------------------------------------
    def ranks(self) -> dict[Key, int]:
        """The rank of every adapted module (rows of ``A``)."""
        return {key: int(a.shape[0]) for key, (a, _) in self.factors.items()}

    def layers(self) -> tuple[int, ...]:
        """The adapted layer indices, ascending."""
        return tuple(sorted({layer for layer, _ in self.factors}))

    def layer_ranks(self) -> dict[int, int]:
        """The rank of each adapted layer (the largest over its modules)."""
        out: dict[int, int] = {}
        for (layer, _), rank in self.ranks().items():
            out[layer] = max(out.get(layer, 0), rank)
        return out

    def num_params(self, *, include_head: bool = True) -> int:
        """Number of parameters: all LoRA factor entries, plus the head's when asked."""
        total = sum(a.size + b.size for a, b in self.factors.values())
        if include_head:
            total += sum(v.size for v in self.head.values())
        return int(total)

    def nbytes(self, bytes_per_param: float = 4, *, include_head: bool = True) -> int:
        """Bytes on the wire at ``bytes_per_param`` per parameter (4 for fp32, 2 for fp16)."""
        if bytes_per_param <= 0:
            raise AdapterInputError(f"`bytes_per_param` must be > 0, got {bytes_per_param!r}")
        return int(np.ceil(self.num_params(include_head=include_head) * bytes_per_param))

    def copy(self) -> AdapterState:
        """A deep copy (new arrays)."""
        return AdapterState(
            factors={k: (a.copy(), b.copy()) for k, (a, b) in self.factors.items()},
            head={k: v.copy() for k, v in self.head.items()},
        )

    def equals(self, other: AdapterState) -> bool:
        """True when both states hold the same keys, shapes and bit-identical values."""
        if self.factors.keys() != other.factors.keys() or self.head.keys() != other.head.keys():
            return False
        for key, (a, b) in self.factors.items():
            oa, ob = other.factors[key]
            if not (np.array_equal(a, oa) and np.array_equal(b, ob)):
                return False
        return all(np.array_equal(v, other.head[k]) for k, v in self.head.items())

    # -- checkpoints --------------------------------------------------------------------
    def to_npz(self, path: str | os.PathLike[str]) -> None:
        """Write the state to an ``.npz`` file (exact ``float32`` round trip, no pickle).

        The arrays are stored as ``a{i}``, ``b{i}`` and ``h{j}``, and a JSON index (format
        version, keys, head names) as a string array, so that any module or head name works.
        """
        keys = sorted(self.factors)
        names = sorted(self.head)
        index = {
            "format_version": FORMAT_VERSION,
            "factors": [[layer, module] for layer, module in keys],
            "head": names,
        }
        arrays: dict[str, np.ndarray] = {_INDEX_KEY: np.array(json.dumps(index))}
        for i, key in enumerate(keys):
            arrays[f"a{i}"], arrays[f"b{i}"] = self.factors[key]
        for j, name in enumerate(names):
            arrays[f"h{j}"] = self.head[name]
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str]) -> AdapterState:
        """Read a state written by :meth:`to_npz`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if _INDEX_KEY not in data.files:
                    raise AdapterInputError(
                        f"{os.fspath(path)} is not a legend adapter checkpoint "
                        f"(no {_INDEX_KEY} entry); write one with AdapterState.to_npz"
                    )
                index = json.loads(str(data[_INDEX_KEY]))
                version = index.get("format_version")
                if version != FORMAT_VERSION:
                    raise AdapterInputError(
                        f"{os.fspath(path)}: adapter format_version {version!r} is not "
                        f"supported; expected {FORMAT_VERSION}"
                    )
                factors = {
                    (int(layer), str(module)): (data[f"a{i}"], data[f"b{i}"])
                    for i, (layer, module) in enumerate(index["factors"])
                }
                head = {str(name): data[f"h{j}"] for j, name in enumerate(index["head"])}
        except AdapterInputError:
            raise
        except FileNotFoundError:
            raise AdapterInputError(
                f"adapter checkpoint {os.fspath(path)} does not exist"
            ) from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise AdapterInputError(
                f"adapter checkpoint {os.fspath(path)} is not readable: {exc}"
            ) from None
        return cls(factors=factors, head=head)


@dataclass(frozen=True, kw_only=True, eq=False)
class ClientUpdate:
    """What a device sends back after local training: its trained slice and its sample count.

    ``num_samples`` (at least 1) weights the device in every aggregation rule.
    """

    device_id: str
    num_samples: int
    state: AdapterState

    def __post_init__(self) -> None:
        if not isinstance(self.device_id, str) or not self.device_id:
            raise AdapterInputError(
                f"`device_id` must be a non-empty string, got {self.device_id!r}"
            )
        if (
            not isinstance(self.num_samples, (int, np.integer))
            or isinstance(self.num_samples, bool)
            or self.num_samples < 1
        ):
            raise AdapterInputError(
                f"`num_samples` of device {self.device_id!r} must be an integer >= 1, "
                f"got {self.num_samples!r}; a device without samples sends no update"
            )
        if not isinstance(self.state, AdapterState):
            raise AdapterInputError(
                f"`state` of device {self.device_id!r} must be an AdapterState, "
                f"got {type(self.state).__name__}"
            )


def init_global(
    spec: ModelSpec, r_max: int, head: Mapping[str, np.ndarray], seed: int
) -> AdapterState:
    """The initial global state: every layer and target module of ``spec`` at rank ``r_max``.

    ``A`` is drawn like PEFT's default (``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in
    ``[-1/sqrt(in), 1/sqrt(in)]``) and ``B`` is zero, so the initial update ``B A`` is zero.
    The head arrays are copied.

    Parameters
    ----------
    spec
        The model shape; its ``modules`` give the ``in``/``out`` of each target module.
    r_max
        The global rank (at least the largest rank any plan uses).
    head
        The initial head weights (e.g. taken from the freshly initialised model).
    seed
        Seed of the ``A`` draw; the same seed gives the same state.
    """
    if not isinstance(r_max, (int, np.integer)) or isinstance(r_max, bool) or r_max < 1:
        raise AdapterInputError(f"`r_max` must be an integer >= 1, got {r_max!r}")
    rng = np.random.default_rng(seed)
    factors: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
    for layer in range(spec.num_layers):
        for module in spec.modules:
            bound = 1.0 / np.sqrt(module.in_features)
            a = rng.uniform(-bound, bound, size=(int(r_max), module.in_features))
            b = np.zeros((module.out_features, int(r_max)), dtype=np.float32)
            factors[(layer, module.name)] = (a.astype(np.float32), b)
    return AdapterState(factors=factors, head={k: np.array(v, copy=True) for k, v in head.items()})


def _check_plan(
    global_state: AdapterState, layers: Sequence[int], ranks: Sequence[int]
) -> dict[int, int]:
    """Validate a device's ``layers``/``ranks`` against the global state; layer -> rank."""
    if len(layers) != len(ranks):
        raise AdapterInputError(
            f"`ranks` must have one entry per layer: {len(layers)} layers, {len(ranks)} ranks"
        )
    global_ranks = global_state.layer_ranks()
    plan: dict[int, int] = {}
    for layer, rank in zip(layers, ranks, strict=True):
        if layer in plan:
            raise AdapterInputError(f"`layers` lists layer {layer} twice: {list(layers)!r}")
        if layer not in global_ranks:
            raise AdapterInputError(
                f"layer {layer} is not in the global adapter state; "
                f"it holds layers {list(global_state.layers())!r}"
            )
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
            raise AdapterInputError(f"rank of layer {layer} must be an integer >= 1, got {rank!r}")
        if rank > global_ranks[layer]:
            raise AdapterInputError(
                f"rank {rank} of layer {layer} exceeds the global rank {global_ranks[layer]}; "
                "raise `r_max` or lower the planned rank"
            )
        plan[int(layer)] = int(rank)
    return plan


def slice_for(
    global_state: AdapterState, layers: Sequence[int], ranks: Sequence[int]
) -> AdapterState:
    """The slice a device trains: for each planned layer ``l`` with rank ``r``, every module's
    ``A[:r, :]`` and ``B[:, :r]`` (HetLoRA-style distribution). Arrays are copies; the head
    is copied.
    """
    plan = _check_plan(global_state, layers, ranks)
    factors = {
        key: (a[: plan[key[0]], :].copy(), b[:, : plan[key[0]]].copy())
        for key, (a, b) in global_state.factors.items()
        if key[0] in plan
    }
    return AdapterState(factors=factors, head={k: v.copy() for k, v in global_state.head.items()})


def _nonfinite(array: np.ndarray) -> str | None:
    if np.isfinite(array).all():
        return None
    nan = int(np.isnan(array).sum())
    inf = int(np.isinf(array).sum())
    return f"{nan} NaN and {inf} Inf values"


def check_update(
    update: ClientUpdate,
    *,
    layers: Sequence[int],
    ranks: Sequence[int],
    global_state: AdapterState,
    frozen_a: bool = False,
) -> list[str]:
    """Every problem of a client's update against its plan; an empty list means acceptable.

    Reported: non-finite (NaN/Inf) values, missing or extra ``(layer, module)`` keys, ``A``
    and ``B`` of different ranks, a rank other than planned, ``in``/``out`` dimensions other
    than the global state's, missing, extra or misshapen head weights and, with
    ``frozen_a=True`` (FFA-LoRA), an ``A`` that differs from the global slice it was sent.

    Parameters
    ----------
    update
        The device's update.
    layers, ranks
        The device's plan for the round (as given to :func:`slice_for`).
    global_state
        The global state the device's slice was cut from.
    frozen_a
        Treat any change of ``A`` as a problem (the device was told to train ``B`` only).

    Raises
    ------
    AdapterInputError
        When the plan itself does not fit the global state (a programming error, not a
        problem of the update).
    """
    plan = _check_plan(global_state, layers, ranks)
    who = f"device {update.device_id!r}"
    problems: list[str] = []
    state = update.state
    expected = {key for key in global_state.factors if key[0] in plan}
    for key in sorted(expected - state.factors.keys()):
        problems.append(f"{who}: {_key_text(key)}: missing (planned at rank {plan[key[0]]})")
    for key in sorted(state.factors.keys() - expected):
        problems.append(f"{who}: {_key_text(key)}: not in the plan")
    for key in sorted(expected & state.factors.keys()):
        a, b = state.factors[key]
        ga, gb = global_state.factors[key]
        where = f"{who}: {_key_text(key)}"
        planned = plan[key[0]]
        shapes_ok = True
        if a.shape[0] != b.shape[1]:
            problems.append(
                f"{where}: A has rank {a.shape[0]} but B has rank {b.shape[1]} "
                f"(shapes {a.shape} and {b.shape})"
            )
            shapes_ok = False
        elif a.shape[0] != planned:
            problems.append(f"{where}: rank {a.shape[0]}, planned {planned}")
            shapes_ok = False
        if a.shape[1] != ga.shape[1]:
            problems.append(f"{where}: A has shape {a.shape}, expected ({planned}, {ga.shape[1]})")
            shapes_ok = False
        if b.shape[0] != gb.shape[0]:
            problems.append(f"{where}: B has shape {b.shape}, expected ({gb.shape[0]}, {planned})")
            shapes_ok = False
        for label, array in (("A", a), ("B", b)):
            bad = _nonfinite(array)
            if bad:
                problems.append(f"{where}: {label} has {bad}")
        if frozen_a and shapes_ok and not np.array_equal(a, ga[:planned, :]):
            problems.append(f"{where}: A changed, but A is frozen (FFA-LoRA trains B only)")
    for name in sorted(global_state.head.keys() - state.head.keys()):
        problems.append(f"{who}: head weight {name!r} is missing")
    for name in sorted(state.head.keys() - global_state.head.keys()):
        problems.append(f"{who}: head weight {name!r} is not part of the model's head")
    for name in sorted(state.head.keys() & global_state.head.keys()):
        value, expected_shape = state.head[name], global_state.head[name].shape
        if value.shape != expected_shape:
            problems.append(
                f"{who}: head weight {name!r} has shape {value.shape}, expected {expected_shape}"
            )
        bad = _nonfinite(value)
        if bad:
            problems.append(f"{who}: head weight {name!r} has {bad}")
    return problems
