"""The mixture model: every expert's LoRA matrices in one shared backbone, a gate, and one task model
(with its expert's head) per task around that backbone.

How it is put together, and why not PEFT's XLoraModel (see ../shared/notes/analysis-and-mixture.md):
XLoraModel renames adapter keys until they start with `model.` (a decoder's layout), so BERT and
DistilBERT experts fail to load; it drops saved task heads and cannot take multiple-choice batches.
Here PEFT's own LoRA layers hold the experts as named adapters of one PeftModel over the bare backbone
(`get_peft_model` + `add_adapter` + `set_peft_model_state_dict`, keys mapped from the task model's
prefix), all active and frozen. LoRA's linear layer adds `lora_B(lora_A(dropout(x))) * scaling` per
active adapter; a forward hook on each expert's `lora_B` multiplies that output by the expert's gate
weight for each token, so a one-hot gate reproduces a single expert exactly. Each task model keeps its
own head (loaded from its expert) and has its backbone attribute pointed at the shared one, so the
mixture works on any architecture whose task models have a `base_model_prefix` backbone: encoders and
decoders alike, multiple choice included (the backbone sees [batch x choices, seq]).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.errors import InputError
from peftlab.mixture.experts import Expert
from peftlab.mixture.gate import GlobalGate, LayerwiseGate, expert_weights
from peftlab.mixture.settings import MixtureSpec

HEAD_PREFIX = "base_model.model."


@dataclass
class GateRecord:
    """Gate weights summed over non-padding tokens, per adapted layer and expert (for heatmaps)."""

    weights: torch.Tensor  # [layers, experts]
    entropy: torch.Tensor  # [layers]: sum of each token's normalised entropy
    tokens: torch.Tensor  # [layers]

    @classmethod
    def empty(cls, layers: int, experts: int) -> GateRecord:
        return cls(torch.zeros(layers, experts), torch.zeros(layers), torch.zeros(layers))

    def add(self, layer: int, weights: torch.Tensor, mask: torch.Tensor | None) -> None:
        w = weights.detach().float().reshape(-1, weights.shape[-1])
        m = torch.ones(w.shape[0]) if mask is None else mask.detach().float().reshape(-1).cpu()
        if m.shape[0] != w.shape[0]:  # a mask of another shape than the layer's tokens: count every token
            m = torch.ones(w.shape[0])
        w = w.cpu()
        experts = w.shape[1]
        p = w.clamp_min(1e-12)
        entropy = -(w * p.log()).sum(-1) / torch.log(torch.tensor(float(experts)))
        self.weights[layer] += (w * m[:, None]).sum(0)
        self.entropy[layer] += (entropy * m).sum()
        self.tokens[layer] += m.sum()

    def summary(self) -> dict[str, Any]:
        """Mean weight per (layer, expert) and mean normalised entropy per layer, over non-padding tokens."""
        n = self.tokens.clamp_min(1)
        return {
            "weights": (self.weights / n[:, None]).tolist(),
            "entropy": (self.entropy / n).tolist(),
            "tokens": int(self.tokens.max().item()),
        }


@dataclass
class _State:
    """What the hooks read during one forward pass."""

    current: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> weights [..., experts] or [experts]
    global_weights: torch.Tensor | None = None  # [..., layers, experts] (global gate)
    mask: torch.Tensor | None = None  # the backbone's attention mask (non-padding tokens)
    fixed: torch.Tensor | None = None  # [experts]: a fixed mix (baselines), no gate
    masked: frozenset[int] = frozenset()  # experts the learned gate may not use (ablation)
    bypass: bool = False  # a merged adapter is active: the hooks do nothing
    inner: bool = False  # inside the global gate's pass without adapters
    record: GateRecord | None = None


class Mixture(nn.Module):
    """Frozen LoRA experts + a gate; `view(task)` is the task's model for training and prediction."""

    def __init__(self, names: list[str], task_models: dict[str, nn.Module], peft_backbone: Any, spec: MixtureSpec):
        super().__init__()
        from peft.tuners.lora import LoraLayer

        self.names = list(names)
        self.spec = spec
        self.tasks = nn.ModuleDict(task_models)
        self._peft = [peft_backbone]  # a list: not registered twice (its model is inside every task model)
        self.state = _State()
        backbone = peft_backbone.base_model.model
        self.layers = [
            (name, m)
            for name, m in backbone.named_modules()
            if isinstance(m, LoraLayer) and any(e in m.lora_A for e in self.names)
        ]
        self.allowed = torch.tensor([[e in m.lora_A for e in self.names] for _, m in self.layers])
        widths = [int(m.in_features) for _, m in self.layers]
        if spec.gate == "global":
            size = int(getattr(backbone.config, "hidden_size", 0) or getattr(backbone.config, "dim", 0))
            self.gate: nn.Module = GlobalGate(size, len(self.layers), len(self.names), spec.depth, spec.gate_size)
        else:
            self.gate = LayerwiseGate(widths, len(self.names), spec.depth, spec.gate_size)
        self._hooks = self._install(backbone)
        self.freeze()

    # --- parameters ----------------------------------------------------------------------------
    def freeze(self) -> None:
        """Only the gate trains (and the experts' LoRA matrices with train_experts); heads stay the experts'."""
        for p in self.tasks.parameters():
            p.requires_grad_(False)
        for p in self.gate.parameters():
            p.requires_grad_(True)
        if self.spec.train_experts:
            for _, layer in self.layers:
                for name in self.names:
                    for part in (layer.lora_A, layer.lora_B):
                        if name in part:
                            part[name].weight.requires_grad_(True)

    @property
    def peft(self) -> Any:
        return self._peft[0]

    # --- hooks ---------------------------------------------------------------------------------
    def _install(self, backbone: nn.Module) -> list[Any]:
        hooks = [backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True)]
        for index, (_, layer) in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(self._layer_entry(index)))
            for e, name in enumerate(self.names):
                if name in layer.lora_B:
                    hooks.append(layer.lora_B[name].register_forward_hook(self._scale(index, e)))
        return hooks

    def _before_backbone(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        s = self.state
        if s.inner:  # the global gate's own pass without adapters
            return
        s.mask = kwargs.get("attention_mask")
        s.current.clear()
        s.global_weights = None
        if s.bypass or s.fixed is not None or not isinstance(self.gate, GlobalGate):
            return
        if kwargs.get("past_key_values") is not None and kwargs.get("use_cache") is not False:
            raise InputError(
                "xlora: gate: global reads a whole pass first and cannot generate with a KV cache "
                "(TaskView.generate turns the cache off); use layerwise to generate with one"
            )
        inner = {**kwargs, **({"use_cache": False} if "use_cache" in kwargs else {})}
        s.inner = True
        try:  # X-LoRA's scaling pass: the base model's hidden states, no adapters, no gradient
            with torch.no_grad(), self.peft.disable_adapter():
                hidden = module(*args, **inner)[0]
        finally:
            s.inner = False
        s.global_weights = self.gate(hidden)  # logits [..., layers, experts]

    def _layer_entry(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            s = self.state
            if s.bypass or s.inner:
                return
            if s.fixed is not None:
                s.current[index] = s.fixed
                return
            allowed = self.allowed[index].to(args[0].device)
            if s.masked:
                allowed = allowed & torch.tensor(
                    [e not in s.masked for e in range(len(self.names))], device=allowed.device
                )
            if s.global_weights is not None:
                logits = s.global_weights[..., index, :]
            else:
                assert isinstance(self.gate, LayerwiseGate)
                logits = self.gate(index, args[0])
            spec = self.spec
            weights = expert_weights(logits, temperature=spec.softmax_temperature, top_k=spec.top_k, allowed=allowed)
            s.current[index] = weights
            if s.record is not None:
                s.record.add(index, weights, s.mask)

        return hook

    def _scale(self, index: int, expert: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            s = self.state
            if s.bypass:
                return None
            weights = s.current.get(index)
            if weights is None:  # a LoRA layer called outside a backbone pass: leave it as it is
                return None
            if weights.dim() == 1:
                return output * weights[expert].to(output.dtype)
            return output * weights[..., expert : expert + 1].to(output.dtype)

        return hook

    # --- modes -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def fixed(self, weights: list[float]) -> Iterator[None]:
        """A fixed mix instead of the gate: one-hot = a single expert, 1/E each = the uniform mix."""
        previous = self.state.fixed
        self.state.fixed = torch.tensor(weights, dtype=torch.float32)
        try:
            yield
        finally:
            self.state.fixed = previous

    @contextlib.contextmanager
    def masked(self, expert: int) -> Iterator[None]:
        """The learned gate without one expert (its weight renormalised over the others): the ablation."""
        self.state.masked = frozenset({expert})
        try:
            yield
        finally:
            self.state.masked = frozenset()

    @contextlib.contextmanager
    def recording(self) -> Iterator[GateRecord]:
        """Sum the learned gate's weights over non-padding tokens while the block runs."""
        self.state.record = GateRecord.empty(len(self.layers), len(self.names))
        try:
            yield self.state.record
        finally:
            self.state.record = None

    @contextlib.contextmanager
    def merged(self, combination: str, density: float) -> Iterator[None]:
        """The experts merged into one static adapter by PEFT's add_weighted_adapter (no gate).

        Weights: 1/E each for the averaging merges (linear, svd, cat: the mean update, like the uniform
        mix); 1 each for the task-arithmetic merges (ties, dare_*, magnitude_prune), as TIES-merging does."""
        lora = self.peft.base_model
        averaging = combination in ("linear", "svd", "cat")
        weights = [1 / len(self.names) if averaging else 1.0] * len(self.names)
        extra = {} if averaging else {"density": density}
        lora.add_weighted_adapter(self.names, weights, "merged", combination_type=combination, **extra)
        lora.set_adapter("merged", inference_mode=True)
        self.state.bypass = True
        try:
            yield
        finally:
            self.state.bypass = False
            lora.set_adapter(self.names, inference_mode=True)
            lora.delete_adapter("merged")
            lora.set_adapter(self.names, inference_mode=True)
            self.freeze()

    def view(self, task: str) -> TaskView:
        return _view_class(type(self.tasks[task]))(self, task)


class TaskView(nn.Module):
    """One task's model inside the mixture: what the Trainer's predict and the training loop call."""

    def __init__(self, mixture: Mixture, task: str) -> None:
        super().__init__()
        self.mixture = mixture
        self.task = task

    def forward(self, **batch: Any) -> Any:
        return self.mixture.tasks[self.task](**batch)

    def generate(self, *args: Any, generation_config: Any = None, **kwargs: Any) -> Any:
        """The task model's own `generate` through the mixture. The global gate reads a whole pass of the
        base model before each pass, which a KV cache (one new token a pass) cannot give it: with that
        gate every new token runs the whole sequence again (slower, the same tokens as a cached pass)."""
        if isinstance(self.mixture.gate, GlobalGate) and self.mixture.state.fixed is None:
            if generation_config is not None:
                generation_config = copy.deepcopy(generation_config)
                generation_config.use_cache = False
            else:
                kwargs["use_cache"] = False
        return self.mixture.tasks[self.task].generate(*args, generation_config=generation_config, **kwargs)


@functools.cache
def _view_class(model_class: type) -> type:
    """A TaskView whose forward shows the task model's signature: the Trainer finds the label columns by
    reading it (`find_labels`), and without them it would return the loss as the first prediction."""

    @functools.wraps(model_class.forward)
    def forward(self: TaskView, *args: Any, **batch: Any) -> Any:
        return self.mixture.tasks[self.task](*args, **batch)

    return type(f"TaskView{model_class.__name__}", (TaskView,), {"forward": forward})


# --- building ------------------------------------------------------------------------------------


def lora_config(expert: Expert) -> Any:
    """The expert's LoRA config for the bare backbone (no task type, no task head)."""
    from peft import LoraConfig

    keep = {
        k: v
        for k, v in expert.adapter.items()
        if k
        in (
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "layers_to_transform",
            "layers_pattern",
            "use_rslora",
            "fan_in_fan_out",
            "rank_pattern",
            "alpha_pattern",
            "exclude_modules",
        )
    }
    if isinstance(keep.get("target_modules"), list):
        keep["target_modules"] = sorted(keep["target_modules"])
    return LoraConfig(**keep)


def split_expert_weights(expert: Expert, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA matrices keyed for a PeftModel over the bare backbone, head weights keyed for the task model)."""
    from safetensors.torch import load_file

    try:
        saved = load_file(str(expert.weights_file))
    except Exception as exc:
        raise InputError(f"expert {expert.folder}: cannot read {expert.weights_file.name} ({exc})") from None
    lora, head = {}, {}
    inner = f"{HEAD_PREFIX}{prefix}." if prefix else HEAD_PREFIX
    for key, value in saved.items():
        if "lora_" in key:
            if not key.startswith(inner):
                raise InputError(f"expert {expert.folder}: adapter key {key} is outside the backbone ({prefix})")
            lora[HEAD_PREFIX + key.removeprefix(inner)] = value
        else:
            head[key.removeprefix(HEAD_PREFIX)] = value
    return lora, head


def assemble(task_models: dict[str, nn.Module], configs: dict[str, Any], spec: MixtureSpec) -> Mixture:
    """One backbone for every task model, each expert's LoRA layers (`configs`: key -> LoraConfig) added
    to it as a named adapter, and the gate: the mixture's architecture, with the experts' matrices as
    PEFT initialises them (`build_mixture` loads the trained ones; `plan` counts this on the meta device)."""
    from peft import get_peft_model

    first = next(iter(task_models.values()))
    prefix = getattr(first, "base_model_prefix", "")
    for key, model in task_models.items():
        if not prefix or getattr(model, prefix, None) is None:
            raise InputError(f"expert '{key}': its task model has no `{prefix or 'backbone'}` backbone to share")
    # The fullest backbone serves every task: BERT's token classifier builds its backbone without the
    # pooler that its sequence classifier and multiple-choice model read.
    shared = max((getattr(m, prefix) for m in task_models.values()), key=lambda b: sum(1 for _ in b.parameters()))
    for model in task_models.values():
        setattr(model, prefix, shared)
    peft_backbone = None
    for key, config in configs.items():
        if peft_backbone is None:
            peft_backbone = get_peft_model(shared, config, adapter_name=key)
        else:
            peft_backbone.add_adapter(key, config)
    assert peft_backbone is not None
    peft_backbone.base_model.set_adapter(list(configs), inference_mode=True)
    return Mixture(list(configs), task_models, peft_backbone, spec)


def build_mixture(experts: list[Expert], spec: MixtureSpec, source: Any, tokenizer: Any, seed: int) -> Mixture:
    """The mixture of these experts: task models sharing one backbone, every expert's trained LoRA
    matrices in it, each task's head from its expert; the gate initialised under `seed`."""
    from peft.utils import set_peft_model_state_dict
    from transformers import set_seed

    task_models: dict[str, nn.Module] = {}
    for expert in experts:  # each seeded as its run was: a random-weight base comes out the same
        set_seed(int(expert.config.get("train", {}).get("seed", seed)))
        task_models[expert.name] = expert.task().build_model(source, tokenizer)
    prefix = getattr(next(iter(task_models.values())), "base_model_prefix", "")
    set_seed(seed)  # the gate's initialisation does not depend on how the models were built
    mixture = assemble(task_models, {e.name: lora_config(e) for e in experts}, spec)
    for expert in experts:
        lora, head = split_expert_weights(expert, prefix)
        result = set_peft_model_state_dict(mixture.peft, lora, adapter_name=expert.name)
        wrong = [k for k in result.unexpected_keys if "lora_" in k]
        missing = [k for k in result.missing_keys if f".{expert.name}." in k and "lora_" in k]
        if wrong or missing:
            raise InputError(
                f"expert {expert.folder}: its LoRA matrices do not fit the base model "
                f"({len(wrong)} unexpected, {len(missing)} missing, e.g. {(wrong or missing)[0]})"
            )
        _load_head(expert, task_models[expert.name], head)
    mixture.freeze()
    return mixture


def _load_head(expert: Expert, model: nn.Module, head: dict[str, torch.Tensor]) -> None:
    """The expert's trained task head into its task model; every head weight must come from the expert."""
    task = expert.task()
    needed = {
        f"{module}.{name}"
        for module in task.head_modules(model)
        for name, _ in model.get_submodule(module).named_parameters()
    }
    missing = sorted(needed - set(head))
    if missing:
        raise InputError(
            f"expert {expert.folder}: no trained head for task '{expert.name}' ({', '.join(missing[:3])} missing); "
            "a mixture scores each task with its expert's head"
        )
    result = model.load_state_dict({k: v for k, v in head.items() if k in needed}, strict=False)
    if result.unexpected_keys:
        raise InputError(f"expert {expert.folder}: head weights that fit no module: {result.unexpected_keys[:3]}")


def head_state(mixture: Mixture) -> dict[str, torch.Tensor]:
    """Every task's head weights, keyed TASK/PARAM (saved beside the gate)."""
    out = {}
    for key, model in mixture.tasks.items():
        prefix = getattr(model, "base_model_prefix", "")
        for name, value in model.state_dict().items():
            if not name.startswith(f"{prefix}."):
                out[f"{key}/{name}"] = value.detach().clone().contiguous()
    return out


def parameter_counts(mixture: Mixture) -> dict[str, int]:
    """Gate, experts' LoRA weights, heads, trainable and total (each shared weight once)."""
    unique = {id(p): p for p in mixture.parameters()}
    lora = {
        id(p): p
        for _, layer in mixture.layers
        for part in (layer.lora_A, layer.lora_B)
        for name in mixture.names
        if name in part
        for p in part[name].parameters()
    }
    return {
        "gate": sum(p.numel() for p in mixture.gate.parameters()),
        "experts": sum(p.numel() for p in lora.values()),
        "heads": sum(v.numel() for v in head_state(mixture).values()),
        "trainable": sum(p.numel() for p in unique.values() if p.requires_grad),
        "total": sum(p.numel() for p in unique.values()),
        "weight_bytes": weight_bytes(mixture),
    }


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights and buffers take, each shared tensor once: measured from the tensors
    (their dtype), so a bf16 or 4-bit base shows as such."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
