"""Apply a device's plan to a Hugging Face model through PEFT, and move adapter weights.

:func:`lora_config_for` is the one place where a plan becomes a PEFT ``LoraConfig``:

* ``target_modules`` are the spec's module names (PEFT suffixes such as ``"query"`` or
  ``"output.dense"``). Where a targeted suffix would also match a module the spec does not
  target (in BERT, ``"output.dense"`` is a suffix of ``"attention.output.dense"``), that
  module goes into ``exclude_modules``, so exactly the planned modules get LoRA.
* ``layers_to_transform`` are the planned layers (``layers_pattern`` named explicitly).
* ``rank_pattern`` gives each layer its rank; ``alpha_pattern`` sets ``alpha_l = s * r_l``
  so that every layer on every device has the same LoRA scale ``s = job.lora_scale``.
* ``lora_dropout = 0`` (deterministic) and the classification head (``classifier`` or
  ``score``) is a ``modules_to_save`` module; the task type is ``SEQ_CLS``.

:class:`AdapterHost` keeps one frozen base model and, per device, injects that device's
adapter, loads its initial weights from an :class:`~legend.federation.adapters.AdapterState`
(the output of :func:`~legend.federation.adapters.slice_for`), hands the model out for
training, extracts the trained state and unloads the adapter again, leaving the base model
bit-identical. Weights move only through PEFT's ``get_peft_model_state_dict`` and
``set_peft_model_state_dict``. After each injection :func:`verify_adapter` checks that
every planned layer and module carries LoRA at the planned rank and that nothing else does
(PEFT silently ignores patterns that match nothing).

Nothing below the lowest adapted layer requires grad: the base is frozen, LoRA sits only
in the planned layers, and neither ``enable_input_require_grads`` nor gradient
checkpointing is ever used, so autograd never records the layers below and backward cost
grows with the depth only.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legend.federation.adapters import AdapterState, Key
from legend.federation.errors import FederationError, FederationInputError
from legend.models.spec import TARGET_MODULE_PRESETS, ModelSpec
from legend.planner.plan import DevicePlan
from legend.planner.profiles import JobParams

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from peft import LoraConfig, PeftModel

__all__ = [
    "ADAPTER_NAME",
    "HEAD_MODULE",
    "IN_LAYER_PATHS",
    "LAYER_CONTAINER",
    "AdapterHost",
    "adapted_modules",
    "lora_config_for",
    "verify_adapter",
]

ADAPTER_NAME = "default"

# Where each spec module name sits inside one transformer layer, per family.
IN_LAYER_PATHS: dict[str, dict[str, str]] = {
    "bert": {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention.output.dense": "attention.output.dense",
        "intermediate.dense": "intermediate.dense",
        "output.dense": "output.dense",
    },
    "llama": {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    },
}
IN_LAYER_PATHS["roberta"] = IN_LAYER_PATHS["bert"]
# The name of the module list holding the layers (``encoder.layer.5`` / ``model.layers.5``).
LAYER_CONTAINER = {"bert": "layer", "roberta": "layer", "llama": "layers"}
# The classification head of ``*ForSequenceClassification`` (trained, FedAvg'd).
HEAD_MODULE = {"bert": "classifier", "roberta": "classifier", "llama": "score"}

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


# -- the plan -> PEFT config mapping -------------------------------------------------------
def _check_device_plan(device_plan: DevicePlan, spec: ModelSpec) -> dict[int, int]:
    who = f"device {device_plan.device_id!r}"
    if not device_plan.layers:
        raise FederationInputError(
            f"{who} has no layers in its plan (it sits the round out); only participating "
            "devices get an adapter"
        )
    if len(device_plan.layers) != len(device_plan.ranks):
        raise FederationInputError(
            f"{who}: `ranks` must have one entry per layer, got {len(device_plan.layers)} "
            f"layers and {len(device_plan.ranks)} ranks"
        )
    out: dict[int, int] = {}
    for layer, rank in zip(device_plan.layers, device_plan.ranks, strict=True):
        if not 0 <= layer < spec.num_layers:
            raise FederationInputError(
                f"{who}: layer {layer} is outside 0..{spec.num_layers - 1} of {spec.name}; "
                "re-plan for this model"
            )
        if layer in out:
            raise FederationInputError(
                f"{who}: layer {layer} appears twice in `layers` {list(device_plan.layers)}"
            )
        if rank < 1:
            raise FederationInputError(
                f"{who}: the rank of layer {layer} must be >= 1, got {rank}; leave a layer "
                "without LoRA out of `layers` instead"
            )
        out[layer] = rank
    return out


def _layer_pattern(family: str, layer: int) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module_name).
    return rf"{LAYER_CONTAINER[family]}\.{layer}\..*"


def _exclusions(spec: ModelSpec) -> list[str]:
    """Untargeted modules of the family that a targeted suffix would also match."""
    targets = set(spec.target_modules)
    family_modules = TARGET_MODULE_PRESETS[spec.family]["all"]
    return [
        m for m in family_modules if m not in targets and any(m.endswith("." + t) for t in targets)
    ]


def lora_config_for(device_plan: DevicePlan, spec: ModelSpec, job: JobParams) -> LoraConfig:
    """The PEFT ``LoraConfig`` of one device's plan; the only place plans reach PEFT.

    Parameters
    ----------
    device_plan
        A participating device's layers and ranks (any layer set, contiguous or not).
    spec
        The model's shape; ``spec.target_modules`` are the adapted modules of each layer.
    job
        ``job.lora_scale`` is the constant LoRA scale ``alpha_l / r_l`` of every layer.

    Raises
    ------
    FederationInputError
        For a non-participating device, unknown layers, repeated layers or ranks below 1.
    """
    from peft import LoraConfig

    ranks = _check_device_plan(device_plan, spec)
    scale = float(job.lora_scale)
    r_max = max(ranks.values())
    rank_pattern = {_layer_pattern(spec.family, layer): r for layer, r in sorted(ranks.items())}
    alpha_pattern = {
        _layer_pattern(spec.family, layer): scale * r for layer, r in sorted(ranks.items())
    }
    exclude = _exclusions(spec)
    return LoraConfig(
        task_type="SEQ_CLS",
        target_modules=list(spec.target_modules),
        exclude_modules=exclude or None,
        layers_to_transform=sorted(ranks),
        layers_pattern=LAYER_CONTAINER[spec.family],
        r=r_max,
        lora_alpha=scale * r_max,  # type: ignore[arg-type]  # PEFT takes any real alpha
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        bias="none",
        modules_to_save=[HEAD_MODULE[spec.family]],
        init_lora_weights=True,
    )


# -- checking what PEFT built --------------------------------------------------------------
def _parse_module_name(name: str, family: str) -> Key | None:
    """``"...encoder.layer.3.attention.self.query"`` -> ``(3, "query")``; None if no match."""
    container = LAYER_CONTAINER[family]
    match = re.search(rf"(?:^|\.){container}\.(\d+)\.(.+)$", name)
    if match is None:
        return None
    path = match.group(2)
    for module, in_layer in IN_LAYER_PATHS[family].items():
        if path == in_layer:
            return int(match.group(1)), module
    return None


def adapted_modules(model: Any, family: str) -> dict[str, tuple[Key | None, int, float]]:
    """Every module of ``model`` that carries the active LoRA adapter.

    Returns ``{module name: ((layer, spec module) or None, rank, scaling)}``.
    """
    from peft.tuners.lora import LoraLayer

    out: dict[str, tuple[Key | None, int, float]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            bare = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
            out[bare] = (
                _parse_module_name(bare, family),
                int(module.r[adapter]),
                float(module.scaling[adapter]),
            )
    return out


def verify_adapter(
    model: Any,
    device_plan: DevicePlan,
    spec: ModelSpec,
    *,
    lora_scale: float | None = None,
) -> None:
    """Check that exactly the planned layers and modules carry LoRA, at the planned ranks.

    Parameters
    ----------
    model
        A PEFT model built from :func:`lora_config_for` (one adapter).
    device_plan, spec
        The plan and model shape it was built from.
    lora_scale
        When given, every adapted module must also have this scaling ``alpha / r``.

    Raises
    ------
    FederationError
        Listing every missing module, unexpected module and wrong rank or scale.
    """
    planned = _check_device_plan(device_plan, spec)
    expected = {(layer, m): r for layer, r in planned.items() for m in spec.target_modules}
    found: dict[Key, int] = {}
    problems: list[str] = []
    for name, (key, rank, scaling) in sorted(adapted_modules(model, spec.family).items()):
        if key is None or key not in expected:
            problems.append(f"`{name}` has LoRA (rank {rank}) but is not in the plan")
            continue
        if key in found:
            problems.append(f"layer {key[0]} `{key[1]}` has LoRA twice (again at `{name}`)")
        found[key] = rank
        if rank != expected[key]:
            problems.append(f"layer {key[0]} `{key[1]}` has rank {rank}, planned {expected[key]}")
        if lora_scale is not None and abs(scaling - lora_scale) > 1e-9 * max(1.0, lora_scale):
            problems.append(
                f"layer {key[0]} `{key[1]}` has LoRA scale {scaling}, expected {lora_scale}"
            )
    for key in sorted(expected.keys() - found.keys()):
        problems.append(f"layer {key[0]} `{key[1]}` has no LoRA (planned rank {expected[key]})")
    if problems:
        raise FederationError(
            f"the PEFT model of device {device_plan.device_id!r} does not match its plan "
            f"(model {spec.name}, modules {list(spec.target_modules)}):\n  " + "\n  ".join(problems)
        )


# -- the adapter host ----------------------------------------------------------------------
class AdapterHost:
    """One frozen base model; one device's adapter at a time.

    Parameters
    ----------
    base_model
        A ``*ForSequenceClassification`` model (see
        :func:`~legend.models.loaders.load_base_model`). It must be frozen; the host
        never changes its weights.
    spec
        The model's shape; its module dimensions are checked against the real model.
    job
        The job (``lora_scale``, ``train_head``).

    Examples
    --------
    >>> host = AdapterHost(base, spec, job)                        # doctest: +SKIP
    >>> with host.activate(device_plan, slice_for(g, layers, ranks)) as model:
    ...     train(model)
    ...     state = host.extract()
    """

    def __init__(self, base_model: Any, spec: ModelSpec, job: JobParams) -> None:
        import torch

        if spec.family not in IN_LAYER_PATHS:
            raise FederationInputError(
                f"model family {spec.family!r} of {spec.name} is not supported; expected one "
                f"of {sorted(IN_LAYER_PATHS)}"
            )
        if hasattr(base_model, "peft_config"):
            raise FederationInputError(
                "`base_model` already carries a PEFT adapter; give the plain transformers model"
            )
        trainable = [n for n, p in base_model.named_parameters() if p.requires_grad]
        if trainable:
            raise FederationInputError(
                f"`base_model` must be frozen, but {len(trainable)} parameters require grad "
                f"(e.g. `{trainable[0]}`); load it with legend.models.loaders.load_base_model"
            )
        from legend.federation.prefix import PREFIX_FAMILIES

        if job.cache_prefix and spec.family not in PREFIX_FAMILIES:
            raise FederationInputError(
                f"`train.cache_prefix` = true needs a model of the "
                f"{' or '.join(PREFIX_FAMILIES)} family; {spec.name} is a {spec.family!r} "
                "model: set it to false"
            )
        self.base_model = base_model
        self.spec = spec
        self.job = job
        self._head_name = HEAD_MODULE[spec.family]
        head = getattr(base_model, self._head_name, None)
        if not isinstance(head, torch.nn.Module):
            raise FederationInputError(
                f"`base_model` has no classification head `{self._head_name}`; load a "
                "*ForSequenceClassification model"
            )
        self._head = head
        self._full_names = self._module_names()
        self._key_of = {name: key for key, name in self._full_names.items()}
        self._peft: PeftModel | None = None
        self._plan: DevicePlan | None = None

    def _module_names(self) -> dict[Key, str]:
        """Map every ``(layer, module)`` of the spec to its module name in the base model,
        checking that it is a linear layer with the spec's dimensions."""
        import torch

        spec = self.spec
        found: dict[Key, str] = {}
        shapes = {m.name: m for m in spec.modules}
        for name, module in self.base_model.named_modules():
            key = _parse_module_name(name, spec.family)
            if key is None or key[1] not in shapes:
                continue
            if key in found:
                raise FederationInputError(
                    f"layer {key[0]} `{key[1]}` matches two modules: `{found[key]}` and `{name}`"
                )
            shape = shapes[key[1]]
            if not isinstance(module, torch.nn.Linear) or (
                module.in_features,
                module.out_features,
            ) != (shape.in_features, shape.out_features):
                raise FederationInputError(
                    f"`{name}` is {module!r}, but the spec {spec.name} expects a linear layer "
                    f"{shape.in_features} -> {shape.out_features}; the spec does not describe "
                    "this model"
                )
            found[key] = name
        missing = [
            (layer, m)
            for layer in range(spec.num_layers)
            for m in spec.target_modules
            if (layer, m) not in found
        ]
        if missing:
            raise FederationInputError(
                f"the base model has no module for {len(missing)} (layer, module) pairs of the "
                f"spec {spec.name}, e.g. {missing[0]}; the spec does not describe this model"
            )
        return found

    # -- install / remove ---------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while a device's adapter is installed."""
        return self._peft is not None

    def _install(
        self,
        device_plan: DevicePlan,
        state: AdapterState,
        *,
        train: bool,
        freeze_a: bool = False,
    ) -> PeftModel:
        import torch
        from peft import get_peft_model

        if self._peft is not None:
            raise FederationError(
                f"an adapter (device {self._plan.device_id if self._plan else '?'!r}) is "
                "still installed; leave its `activate` block first"
            )
        config = lora_config_for(device_plan, self.spec, self.job)
        expected = self._check_state(device_plan, state)
        # Injection initialises LoRA weights with torch's global RNG; fork it so that the
        # number of devices served never shifts the random stream of training.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(self.base_model, config, adapter_name=ADAPTER_NAME)
        self._peft, self._plan = peft_model, device_plan
        try:
            verify_adapter(peft_model, device_plan, self.spec, lora_scale=self.job.lora_scale)
            self._load(peft_model, state, expected)
            # PEFT made exactly the LoRA factors and the head's trainable copy require grad;
            # narrow that down for evaluation, FFA-LoRA and a frozen head.
            for name, parameter in peft_model.named_parameters():
                if not parameter.requires_grad:
                    continue
                is_a = ".lora_A." in name
                is_head = not is_a and ".lora_B." not in name
                if not train or (freeze_a and is_a) or (is_head and not self.job.train_head):
                    parameter.requires_grad_(False)
            peft_model.train(train)
        except BaseException:
            self._remove()
            raise
        return peft_model

    def _check_state(self, device_plan: DevicePlan, state: AdapterState) -> set[Key]:
        ranks = _check_device_plan(device_plan, self.spec)
        expected = {(layer, m) for layer in ranks for m in self.spec.target_modules}
        have = set(state.factors)
        problems = []
        if have != expected:
            missing = sorted(expected - have)
            extra = sorted(have - expected)
            problems.append(f"missing {missing[:4]}, extra {extra[:4]}")
        for key in sorted(expected & have):
            a, b = state.factors[key]
            shape = next(m for m in self.spec.modules if m.name == key[1])
            r = ranks[key[0]]
            if a.shape != (r, shape.in_features) or b.shape != (shape.out_features, r):
                problems.append(
                    f"layer {key[0]} `{key[1]}`: A {a.shape}, B {b.shape}; expected "
                    f"A ({r}, {shape.in_features}), B ({shape.out_features}, {r})"
                )
        head_names = {name for name, _ in self._head.named_parameters()}
        head_expected = {f"{self._head_name}.{n}" for n in head_names}
        if set(state.head) != head_expected:
            problems.append(f"head weights {sorted(state.head)}; expected {sorted(head_expected)}")
        if problems:
            raise FederationInputError(
                f"the adapter state for device {device_plan.device_id!r} does not fit its plan "
                f"(layers {list(device_plan.layers)}, ranks {list(device_plan.ranks)}): "
                + "; ".join(problems)
                + "; cut it from the global state with slice_for(global, layers, ranks)"
            )
        return expected

    def _load(self, peft_model: PeftModel, state: AdapterState, expected: set[Key]) -> None:
        import torch
        from peft import set_peft_model_state_dict

        tensors: dict[str, torch.Tensor] = {}
        for key in expected:
            a, b = state.factors[key]
            name = _PEFT_PREFIX + self._full_names[key]
            tensors[f"{name}.lora_A.weight"] = torch.from_numpy(a.copy())
            tensors[f"{name}.lora_B.weight"] = torch.from_numpy(b.copy())
        for name, value in state.head.items():
            tensors[_PEFT_PREFIX + name] = torch.from_numpy(value.copy())
        result = set_peft_model_state_dict(peft_model, tensors, adapter_name=ADAPTER_NAME)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise FederationError(
                f"PEFT did not accept {len(unexpected)} adapter weights, e.g. {unexpected[:3]}"
            )
        # Every weight of the adapter must have come from the state: compare what PEFT holds.
        held = self._state_dict(peft_model)
        if set(held) != set(tensors):
            raise FederationError(
                "the PEFT adapter holds weights the state did not set: "
                f"{sorted(set(held) - set(tensors))[:3]} (and lacks "
                f"{sorted(set(tensors) - set(held))[:3]})"
            )

    @staticmethod
    def _state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME))

    def _remove(self) -> None:
        peft_model, self._peft, self._plan = self._peft, None, None
        if peft_model is None:
            return
        base = peft_model.unload()
        if base is not self.base_model:  # pragma: no cover - PEFT contract
            raise FederationError("PEFT's unload returned a different model than the base")
        # unload() leaves the trained head copy in place; put the original module back.
        setattr(self.base_model, self._head_name, self._head)
        for parameter in self.base_model.parameters():
            parameter.requires_grad_(False)
        self.base_model.eval()

    # -- public API -----------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(
        self, device_plan: DevicePlan, init_state: AdapterState, *, freeze_a: bool = False
    ) -> Iterator[PeftModel]:
        """Install ``device_plan``'s adapter with ``init_state``'s weights; yield it to train.

        The yielded model is in train mode; exactly the LoRA factors (only ``B`` with
        ``freeze_a=True``, as in FFA-LoRA) and the head (if ``job.train_head``) require grad.
        Call :meth:`extract` inside the block; on exit the adapter is removed.
        """
        model = self._install(device_plan, init_state, train=True, freeze_a=freeze_a)
        try:
            yield model
        finally:
            self._remove()

    @contextlib.contextmanager
    def activate_global(self, global_state: AdapterState) -> Iterator[PeftModel]:
        """Install ``global_state``'s adapter, every layer at its rank, trainable like a
        device's (:meth:`activate`): what the server's probe of every layer differentiates
        (``probe_layer_decrease`` in :mod:`legend.federation.training`)."""
        with self.activate(self._global_plan(global_state, "global"), global_state) as model:
            yield model

    def extract(self) -> AdapterState:
        """The installed adapter's current weights as a numpy ``float32`` state."""
        import torch

        if self._peft is None:
            raise FederationError("no adapter is installed; call extract() inside activate()")
        factors: dict[Key, list[Any]] = {}
        head: dict[str, Any] = {}
        for name, tensor in self._state_dict(self._peft).items():
            value = tensor.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
            bare = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
            match = _LORA_KEY.match(bare)
            if match is not None:
                key = self._key_of.get(match.group("module"))
                if key is None:
                    raise FederationError(f"PEFT adapter weight `{name}` is not in the spec")
                pair = factors.setdefault(key, [None, None])
                pair[0 if match.group("factor") == "A" else 1] = value
            elif bare.startswith(self._head_name + "."):
                head[bare] = value
            else:
                raise FederationError(f"unexpected adapter weight `{name}`")
        return AdapterState(factors={k: (a, b) for k, (a, b) in factors.items()}, head=head)

    def layer_parameters(self) -> dict[int, list[torch.nn.Parameter]]:
        """The installed adapter's trainable LoRA factors, by model layer (call inside
        :meth:`activate`; the head is in no layer)."""
        if self._peft is None:
            raise FederationError("no adapter is installed; call inside activate()")
        suffix = f".{ADAPTER_NAME}.weight"
        out: dict[int, list[torch.nn.Parameter]] = {}
        for name, parameter in self._peft.named_parameters():
            if not parameter.requires_grad or not name.endswith(suffix):
                continue
            bare = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
            match = _LORA_KEY.match(bare[: -len(suffix)] + ".weight")
            key = None if match is None else self._key_of.get(match.group("module"))
            if key is not None:
                out.setdefault(key[0], []).append(parameter)
        return out

    def _global_plan(self, state: AdapterState, device_id: str) -> DevicePlan:
        layer_ranks = state.layer_ranks()
        if not layer_ranks:
            raise FederationInputError("the adapter state has no LoRA factors")
        layers = tuple(sorted(layer_ranks))
        return DevicePlan(
            device_id=device_id, layers=layers, ranks=tuple(layer_ranks[layer] for layer in layers)
        )

    @contextlib.contextmanager
    def evaluation_model(self, global_state: AdapterState) -> Iterator[PeftModel]:
        """Yield the base model with ``global_state``'s adapter (every layer at its rank),
        frozen and in eval mode; the adapter is removed on exit."""
        plan = self._global_plan(global_state, "global")
        model = self._install(plan, global_state, train=False)
        try:
            yield model
        finally:
            self._remove()

    def save_pretrained(self, global_state: AdapterState, out_dir: str | Path) -> Path:
        """Write ``global_state`` in PEFT's ``save_pretrained`` format.

        Load it back with ``PeftModel.from_pretrained(load_base_model(model), out_dir)``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with self.evaluation_model(global_state) as model:
            model.save_pretrained(str(out))
        return out

    def initial_head(self) -> dict[str, Any]:
        """The base model's head weights as numpy ``float32`` (for ``init_global``)."""
        import torch

        return {
            f"{self._head_name}.{name}": p.detach()
            .to(device="cpu", dtype=torch.float32)
            .numpy()
            .copy()
            for name, p in self._head.named_parameters()
        }
