"""The per-device, per-round cost model (docs/costs.md).

Every cost of a configuration (a contiguous block of layers ending at the output, one rank
per layer) is *linear* in the planner's binaries ``x[l, k]`` (layer ``l`` at rank
``ranks[k]``): a constant plus one coefficient per ``(l, k)``. :meth:`CostModel.table`
returns those coefficients for the formulation; :meth:`CostModel.evaluate` computes the
same quantities directly from a configuration and is what validators and the simulated
clock use.

Time of device ``i``:

    compute_s  = steps_i * (F_fwd + sum_l (F_bwd_l + r_l * F_lora_l)) / speed_i
    download_s = B_i / downlink_i,   upload_s = B_i / uplink_i
    time_s     = compute_s + download_s + upload_s

with ``B_i = bytes_per_param * (sum_l r_l p_l + head params)``. With the frozen-prefix cache
(``JobParams.cache_prefix``) a step runs forward only through the ``depth`` layers from the
lowest adapted one up: ``F_fwd`` becomes ``F_fwd - (L - depth) * F_layer`` (the layers
below are read from the device's cache), still affine in the depth. FLOPs come from the
:class:`~legend.models.spec.ModelSpec` (analytic) or from a :class:`Calibration` measured on
the host (``legend calibrate``), in which case host seconds are scaled to the device by the
ratio of effective TFLOPS.

Memory of device ``i`` is affine in the configuration's backward depth ``d`` (the number of
adapted layers for the planner's contiguous top blocks) and its rank sum ``S = sum_l r_l``:

    memory = static + d * per_layer + S * per_rank

Analytic (no calibration, or a calibration without memory):

    static    = frozen weights at ``weight_precision`` + head in fp32 + the head's AdamW state
                + workspace (one layer's transient activations and the embedding output)
    per_layer = activations one adapted layer saves for backward
    per_rank  = AdamW state of one unit rank's LoRA parameters (16 bytes each: weight,
                gradient, two moments)

Measured (a :class:`Calibration` with ``memory_*`` fields, written by ``legend calibrate``):
the three coefficients are the tightest affine upper bound of the peak memory of real
training steps measured on the host. For a job whose batch shape or weight precision differs
from the calibration's, ``per_layer`` scales with the analytic activations and ``static``
moves by the analytic difference; both are unchanged for the calibrated shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from legend.models.spec import ModelSpec
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import DeviceProfile, JobParams

__all__ = ["Calibration", "ConfigCost", "CostModel", "CostTable", "MemoryModel"]

OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 AdamW: weight, gradient, two moments
ACT_BYTES = 4  # activations are fp32 in training here


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Host timings of one model at one batch shape (``legend calibrate`` writes it).

    ``forward_s`` is one forward pass of the batch; ``backward_per_layer_s`` the extra time
    of a backward pass per adapted layer; ``lora_per_rank_s`` the extra step time per unit
    rank and adapted layer. ``host_tflops`` is the host's effective throughput implied by the
    forward pass and the analytic FLOP count; device times are host times scaled by
    ``host_tflops / device.tflops``.
    """

    model: str
    batch_size: int
    seq_len: int
    forward_s: float
    backward_per_layer_s: float
    lora_per_rank_s: float
    host_tflops: float
    peak_memory_bytes: float | None = None
    target_modules: tuple[str, ...] = ()
    host: str = ""
    memory_static_bytes: float | None = None
    """Measured memory of a participating device whatever its configuration (frozen model,
    head and its optimizer state, workspace, runtime slack), at this batch shape."""
    memory_per_layer_bytes: float | None = None
    """Measured memory per layer that backward runs through (saved activations)."""
    memory_per_rank_bytes: float | None = None
    """Measured memory per unit of rank sum (LoRA weights, gradients, AdamW moments)."""
    memory_headroom_bytes: float | None = None
    """The part of ``memory_static_bytes`` that covers configurations not measured."""
    memory_samples: tuple[tuple[int, int, float], ...] = ()
    """The measurements behind the memory fields: ``(depth, rank, peak bytes)``."""
    memory_method: str = ""
    """How the peaks were measured (for example the process's peak resident memory)."""

    def __post_init__(self) -> None:
        memory = (self.memory_static_bytes, self.memory_per_layer_bytes, self.memory_per_rank_bytes)
        given = [v is not None for v in memory]
        if any(given) and not all(given):
            raise PlannerInputError(
                "a calibration's memory_static_bytes, memory_per_layer_bytes and "
                "memory_per_rank_bytes are given together or not at all"
            )
        if all(given) and any(v < 0 for v in memory if v is not None):
            raise PlannerInputError(f"a calibration's memory coefficients must be >= 0: {memory}")

    @property
    def has_memory(self) -> bool:
        """Whether the memory coefficients were measured (files older than them lack them)."""
        return self.memory_static_bytes is not None

    def to_json(self) -> str:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["memory_samples"] = [list(s) for s in self.memory_samples]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        data["target_modules"] = tuple(data.get("target_modules", ()))
        data["memory_samples"] = tuple(
            (int(d), int(r), float(m)) for d, r, m in data.get("memory_samples", ())
        )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            return cls.from_json(Path(path).read_text())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise PlannerInputError(
                f"calibration file {path} is not a legend calibration: {exc}; "
                "create one with `legend calibrate --model MODEL`"
            ) from None


@dataclass(frozen=True, kw_only=True)
class ConfigCost:
    """Costs of one device's configuration for one round."""

    compute_s: float
    download_s: float
    upload_s: float
    time_s: float
    trainable_params: int
    download_bytes: float
    upload_bytes: float
    memory_bytes: float


@dataclass(frozen=True, kw_only=True)
class MemoryModel:
    """``memory = static_bytes + d * per_layer_bytes + S * per_rank_bytes`` for a device that
    runs backward through ``d`` layers with rank sum ``S``; ``measured`` says whether the
    coefficients come from a calibration's measurements or from the analytic model."""

    static_bytes: float
    per_layer_bytes: float
    per_rank_bytes: float
    measured: bool

    def bytes(self, depth: int, rank_sum: int) -> float:
        return self.static_bytes + depth * self.per_layer_bytes + rank_sum * self.per_rank_bytes


@dataclass(frozen=True, kw_only=True)
class CostTable:
    """Linear coefficients of one device's costs: ``value = const + sum x[l,k] * coef[l][k]``.

    ``coef`` tuples are indexed ``[layer][rank index]``. A non-participating device costs 0.
    """

    time_const_s: float
    time_coef_s: tuple[tuple[float, ...], ...]
    memory_const_bytes: float
    memory_coef_bytes: tuple[tuple[float, ...], ...]
    bytes_const: float
    bytes_coef: tuple[tuple[float, ...], ...]
    compute_const_s: float
    compute_coef_s: tuple[tuple[float, ...], ...]


class CostModel:
    """Predicts time, bytes and memory of configurations for a model and a job.

    Parameters
    ----------
    spec
        The model's shape.
    job
        Batch size, sequence length, local steps, precisions and rank grid.
    calibration
        Host timings; when given, compute times are calibrated instead of analytic, and
        when it carries measured memory coefficients, so is memory (constraint C6).
    """

    def __init__(
        self, spec: ModelSpec, job: JobParams, calibration: Calibration | None = None
    ) -> None:
        self.spec = spec
        self.job = job
        self.calibration = calibration
        tokens = job.batch_size * job.seq_len
        self._tokens = tokens
        if calibration is None:
            # FLOPs per local step.
            self._fwd = spec.forward_flops_per_token(job.seq_len) * tokens
            self._bwd_layer = spec.layer_forward_flops_per_token(job.seq_len) * tokens
            self._lora_rank = spec.lora_flops_per_token_per_rank() * tokens
            self._head_bwd = 2.0 * spec.head_params * tokens
            self._fwd_layer = self._bwd_layer
        else:
            # Host seconds per local step, scaled to this job's token count; converted to
            # "host-equivalent FLOPs" so that dividing by device FLOP/s gives device seconds.
            ratio = tokens / (calibration.batch_size * calibration.seq_len)
            host_flops_per_s = calibration.host_tflops * 1e12
            self._fwd = calibration.forward_s * ratio * host_flops_per_s
            self._bwd_layer = calibration.backward_per_layer_s * ratio * host_flops_per_s
            self._lora_rank = calibration.lora_per_rank_s * ratio * host_flops_per_s
            self._head_bwd = 0.0  # included in the measured backward
            # the measured forward pass, shared evenly by the layers (the embeddings' small
            # share with them)
            self._fwd_layer = self._fwd / spec.num_layers
        # the forward FLOPs a step needs whatever its depth: all of them without the cache;
        # with it, what the layers leave (embeddings and pooler) plus, per layer of depth,
        # one layer's forward (``_step_fwd_layer``)
        self._step_fwd_const = self._fwd
        self._step_fwd_layer = 0.0
        if job.cache_prefix:
            self._step_fwd_const = self._fwd - spec.num_layers * self._fwd_layer
            self._step_fwd_layer = self._fwd_layer
        self._memory = self._memory_model()

    # -- the pieces ---------------------------------------------------------------------
    def head_params(self) -> int:
        return self.spec.head_params if self.job.train_head else 0

    def trainable_params(self, layers: tuple[int, ...], ranks: tuple[int, ...]) -> int:
        return self.spec.lora_params(layers, ranks) + self.head_params()

    def backward_depth(self, layers: tuple[int, ...]) -> int:
        """Layers backward runs through: from the output down to the lowest adapted layer.

        Equal to ``len(layers)`` for the planner's contiguous top blocks; larger for a
        scattered layer set (FedRA-style baselines), where autograd still has to pass every
        layer above the lowest adapted one.
        """
        return self.spec.num_layers - min(layers) if layers else 0

    def step_flops(self, layers: tuple[int, ...], ranks: tuple[int, ...]) -> float:
        """FLOPs (or calibrated host-equivalent FLOPs) of one local step."""
        if not layers:
            return 0.0
        depth = self.backward_depth(layers)
        return (
            self._step_fwd_const
            + self._head_bwd
            + depth * (self._step_fwd_layer + self._bwd_layer)
            + sum(ranks) * self._lora_rank
        )

    def compute_coefficients(self, steps_per_flops: Any) -> tuple[Any, Any, Any]:
        """Compute time as ``const + per_layer * depth + per_rank * rank_sum`` (seconds).

        ``steps_per_flops`` is ``local_steps / flops_per_s`` of one device or a NumPy vector
        of them; the result has the same shape. The same numbers as :meth:`evaluate` for
        the planner's contiguous top blocks, vectorised over a fleet.
        """
        return (
            steps_per_flops * (self._step_fwd_const + self._head_bwd),
            steps_per_flops * (self._step_fwd_layer + self._bwd_layer),
            steps_per_flops * self._lora_rank,
        )

    def _analytic_static_bytes(self, job: JobParams) -> float:
        spec = self.spec
        frozen = (spec.total_params - spec.head_params) * job.weight_bytes
        head = spec.head_params * ACT_BYTES
        head_opt = (spec.head_params if job.train_head else 0) * OPTIMIZER_BYTES_PER_PARAM
        workspace = (
            job.batch_size
            * job.seq_len
            * (4 * spec.hidden_size + spec.intermediate_size)
            * ACT_BYTES
            + job.batch_size * spec.num_attention_heads * job.seq_len * job.seq_len * ACT_BYTES
        )
        return frozen + head + head_opt + workspace

    def _analytic_layer_bytes(self, job: JobParams) -> float:
        return float(self.spec.activation_bytes_per_layer(job.batch_size, job.seq_len, ACT_BYTES))

    def _memory_model(self) -> MemoryModel:
        cal = self.calibration
        if cal is None or not cal.has_memory:
            return MemoryModel(
                static_bytes=self._analytic_static_bytes(self.job),
                per_layer_bytes=self._analytic_layer_bytes(self.job),
                per_rank_bytes=float(self.spec.params_per_rank * OPTIMIZER_BYTES_PER_PARAM),
                measured=False,
            )
        assert cal.memory_static_bytes is not None
        assert cal.memory_per_layer_bytes is not None
        assert cal.memory_per_rank_bytes is not None
        # The host measured fp32 weights at the calibration's batch shape; another shape or
        # precision moves the measured figures by the analytic model's difference.
        host_job = self.job.with_(
            batch_size=cal.batch_size, seq_len=cal.seq_len, weight_precision="fp32"
        )
        static = cal.memory_static_bytes + (
            self._analytic_static_bytes(self.job) - self._analytic_static_bytes(host_job)
        )
        layer_ratio = self._analytic_layer_bytes(self.job) / self._analytic_layer_bytes(host_job)
        return MemoryModel(
            static_bytes=max(0.0, static),
            per_layer_bytes=cal.memory_per_layer_bytes * layer_ratio,
            per_rank_bytes=cal.memory_per_rank_bytes,
            measured=True,
        )

    @property
    def memory_model(self) -> MemoryModel:
        """The affine memory model C6 uses (measured when the calibration has memory)."""
        return self._memory

    def static_memory_bytes(self) -> float:
        """Memory a participating device needs whatever the configuration."""
        return self._memory.static_bytes

    def layer_memory_bytes(self) -> float:
        """Memory per layer that backward runs through."""
        return self._memory.per_layer_bytes

    def memory_bytes(self, layers: tuple[int, ...], ranks: tuple[int, ...]) -> float:
        """Predicted peak memory of training ``layers`` at ``ranks`` (0 for no layers)."""
        if not layers:
            return 0.0
        return self._memory.bytes(self.backward_depth(layers), sum(ranks))

    def prefix_build_flops(self, num_samples: int) -> float:
        """FLOPs of a device computing its frozen-prefix features (0 without the cache): one
        forward pass of its ``num_samples`` samples through the embeddings and every layer
        but the top one, so that a plan of any depth can start from them."""
        if not self.job.cache_prefix:
            return 0.0
        per_sample = (self._fwd - self._fwd_layer) / self.job.batch_size
        return num_samples * per_sample

    def prefix_build_s(self, device: DeviceProfile, num_samples: int | None = None) -> float:
        """Seconds ``device`` takes to compute its frozen-prefix features for
        ``num_samples`` samples (default: its profile's) (0 without the cache)."""
        n = device.num_samples if num_samples is None else num_samples
        return self.prefix_build_flops(n) / device.flops_per_s

    def setup_s(self, device: DeviceProfile) -> float:
        """Seconds a participating device spends before its local steps: computing its
        frozen-prefix features if the job caches them and it does not hold them yet.

        The planner charges it to every configuration of such a device (so costs stay affine
        in depth and rank sum); the simulated clock charges it only where the device's plan
        starts above layer 0, the only plans that read the features (a device planned at
        full depth is predicted slower than it runs)."""
        if not self.job.cache_prefix or device.prefix_built:
            return 0.0
        return self.prefix_build_s(device)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(
        self, device: DeviceProfile, layers: tuple[int, ...], ranks: tuple[int, ...]
    ) -> ConfigCost:
        """Costs of ``device`` training ``layers`` at ``ranks`` (empty: not participating)."""
        if not layers:
            return ConfigCost(
                compute_s=0.0,
                download_s=0.0,
                upload_s=0.0,
                time_s=0.0,
                trainable_params=0,
                download_bytes=0.0,
                upload_bytes=0.0,
                memory_bytes=0.0,
            )
        steps = self.job.steps_for(device)
        compute = steps * self.step_flops(layers, ranks) / device.flops_per_s
        compute += self.setup_s(device)
        params = self.trainable_params(layers, ranks)
        nbytes = float(params * self.job.bytes_per_param)
        down = nbytes / device.downlink_bps
        up = nbytes / device.uplink_bps
        memory = self.memory_bytes(layers, ranks)
        return ConfigCost(
            compute_s=compute,
            download_s=down,
            upload_s=up,
            time_s=compute + down + up,
            trainable_params=params,
            download_bytes=nbytes,
            upload_bytes=nbytes,
            memory_bytes=memory,
        )

    def table(self, device: DeviceProfile) -> CostTable:
        """Linear coefficients of :meth:`evaluate` for the formulation."""
        steps = self.job.steps_for(device)
        speed = device.flops_per_s
        bpp = self.job.bytes_per_param
        link = 1.0 / device.downlink_bps + 1.0 / device.uplink_bps
        p = self.spec.params_per_rank
        compute_const = steps * (self._step_fwd_const + self._head_bwd) / speed
        compute_const += self.setup_s(device)
        bytes_const = float(self.head_params() * bpp)
        per_layer = self._step_fwd_layer + self._bwd_layer
        compute_coef = tuple(
            tuple(steps * (per_layer + r * self._lora_rank) / speed for r in self.job.ranks)
            for _ in range(self.spec.num_layers)
        )
        bytes_coef = tuple(
            tuple(float(r * p * bpp) for r in self.job.ranks) for _ in range(self.spec.num_layers)
        )
        time_coef = tuple(
            tuple(c + b * link for c, b in zip(crow, brow, strict=True))
            for crow, brow in zip(compute_coef, bytes_coef, strict=True)
        )
        mem = self._memory
        memory_coef = tuple(
            tuple(mem.per_layer_bytes + r * mem.per_rank_bytes for r in self.job.ranks)
            for _ in range(self.spec.num_layers)
        )
        return CostTable(
            time_const_s=compute_const + bytes_const * link,
            time_coef_s=time_coef,
            memory_const_bytes=self.static_memory_bytes(),
            memory_coef_bytes=memory_coef,
            bytes_const=bytes_const,
            bytes_coef=bytes_coef,
            compute_const_s=compute_const,
            compute_coef_s=compute_coef,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.spec.name,
            "calibrated": self.calibration is not None,
            "memory_measured": self._memory.measured,
            "job": self.job.to_dict(),
        }
