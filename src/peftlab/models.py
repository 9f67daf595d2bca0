"""Where a model comes from: a hub id, a local folder, `asset:NAME`, or an architecture with random weights.

Tasks call `instantiate(AutoModelForX, source, ...)` and never care which of the four it is.
Random-weight models (`{arch: bert, random_init: true, ...}`) are built from a configuration:
the transformers defaults for that model type, optionally a known configuration (`base:`) from
`KNOWN_CONFIGS`, then the user's `config:` overrides. They use a tiny built-in WordPiece vocabulary
unless a tokenizer is named, so tests and `plan` need no download at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import InputError, did_you_mean

TINY_VOCAB = Path(__file__).parent / "resources" / "tiny-vocab.txt"

# Configurations of the models the reference studies name, for `plan` when the hub is unreachable
# (values from each model's config.json on the hub). Only architecture fields: enough to build the
# model with random weights and count its parameters exactly.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "distilbert-base-uncased": {
        "model_type": "distilbert",
        "vocab_size": 30522,
        "dim": 768,
        "n_layers": 6,
        "n_heads": 12,
        "hidden_dim": 3072,
        "max_position_embeddings": 512,
        "sinusoidal_pos_embds": False,
        "pad_token_id": 0,
    },
    "bert-base-uncased": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    },
    "bert-large-uncased": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    },
    "roberta-base": {
        "model_type": "roberta",
        "vocab_size": 50265,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
    "meta-llama/Llama-3.2-1B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "head_dim": 64,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
    "sentence-transformers/all-MiniLM-L6-v2": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    },
}
KNOWN_CONFIGS["meta-llama/Llama-3.2-1B-Instruct"] = KNOWN_CONFIGS["meta-llama/Llama-3.2-1B"]
KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"] = {  # the offline asset smollm2-135m
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


HUB_PROBED = "PEFTLAB_HUB_PROBED"  # "reachable" | "unreachable": decided once, inherited by workers


def offline_unless_hub_reachable(timeout: float = 2.0) -> bool:
    """Switch the HF libraries to offline mode when the hub cannot be reached; True if it did.

    Without this, every hub lookup of an unreachable hub is retried with back-off for about half a
    minute, so `plan` on a config naming hub models took minutes before falling back to
    KNOWN_CONFIGS. Offline mode fails at once and still serves anything in the local HF cache.
    Called only where a hub id is about to be used (a hub model or dataset), never for configs that
    name assets, local folders or random weights. It honours HF_HUB_OFFLINE (already offline: no
    probe), HF_ENDPOINT (the host asked) and the proxy variables (an HTTP HEAD through urllib, which
    reads them). The decision is put in the environment, so worker processes inherit it, not repeat it.
    """
    if _env_true("HF_HUB_OFFLINE"):
        return False
    decided = os.environ.get(HUB_PROBED)
    if decided is None:
        decided = (
            "reachable"
            if _answers(os.environ.get("HF_ENDPOINT") or "https://huggingface.co", timeout)
            else "unreachable"
        )
        os.environ[HUB_PROBED] = decided
    if decided == "reachable":
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True
    return True


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _answers(url: str, timeout: float) -> bool:
    """True when the server at `url` answers at all (any HTTP status), through the configured proxies."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered, with an error status: reachable
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference. `path` is what from_pretrained receives (hub id or folder)."""

    kind: str  # hub | local | asset | random
    ref: str  # as written: hub id, path, asset name, or architecture
    path: str | None = None
    arch: str | None = None
    base: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None

    def describe(self) -> str:
        if self.kind == "random":
            base = f" from {self.base}" if self.base else ""
            return f"{self.arch}{base}, random weights"
        return {"asset": f"asset:{self.ref}", "local": self.ref, "hub": self.ref}[self.kind]


def resolve_model(spec: Any, base_dir: Path | None = None) -> ModelSource:
    """Turn the experiment's `model:` value into a ModelSource (asset/local paths resolved)."""
    if not isinstance(spec, str):
        data = spec if isinstance(spec, dict) else spec.model_dump()
        if data.get("base") and data["base"] not in KNOWN_CONFIGS:
            raise InputError(
                f"model.base: unknown configuration '{data['base']}'"
                f"{did_you_mean(data['base'], KNOWN_CONFIGS)}; known: {', '.join(KNOWN_CONFIGS)}"
            )
        return ModelSource(
            kind="random",
            ref=data["arch"],
            arch=data["arch"],
            base=data.get("base"),
            overrides=dict(data.get("config") or {}),
            tokenizer=data.get("tokenizer"),
        )
    if spec.startswith("asset:"):
        from peftlab import assets

        name = spec.split(":", 1)[1]
        if assets.get(name).kind != "model":
            raise InputError(f"model: asset '{name}' is a dataset, not a model (see `peftlab assets list`)")
        assets.ensure(name)  # fetched on first use
        folder = assets.locate(name) / assets.manifest(name).get("model_dir", "model")
        return ModelSource(kind="asset", ref=name, path=str(folder))
    local = Path(spec).expanduser()
    if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
        local = base_dir / local
    if local.exists():
        return ModelSource(kind="local", ref=spec, path=str(local.resolve()))
    offline_unless_hub_reachable()  # a hub id: find out once whether the hub answers
    return ModelSource(kind="hub", ref=spec, path=spec)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report for every freshly initialised head; peftlab says it once."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _hub_error(source: ModelSource, exc: Exception) -> InputError:
    if "safetensors" in str(exc):
        return InputError(
            f"model '{source.ref}': no safetensors weights ({str(exc).splitlines()[0][:200]}). peftlab loads "
            "weights only from .safetensors files (a pickled .bin checkpoint can run code when loaded); "
            "convert it once with transformers: AutoModel...from_pretrained(folder).save_pretrained(folder)"
        )
    return InputError(
        f"model '{source.ref}': cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
        "If the Hugging Face Hub is unreachable here, use an offline asset (peftlab assets list), "
        "a local folder, or {arch: ..., random_init: true}."
    )


def load_config(source: ModelSource, *, allow_known: bool = False) -> tuple[Any, str | None]:
    """The model's configuration, and a note when it came from peftlab's built-in table.

    With allow_known=True (used by `plan`), a hub id that cannot be reached but is in KNOWN_CONFIGS
    falls back to that table, and the note says so.
    """
    from transformers import AutoConfig

    if source.kind == "random":
        base = dict(KNOWN_CONFIGS.get(source.base, {})) if source.base else {}
        base.pop("model_type", None)
        try:
            return AutoConfig.for_model(source.arch, **{**base, **source.overrides}), None
        except ValueError as exc:
            raise InputError(f"model.arch: {exc}") from None
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(source.path, **SAFE_LOADING), None
    except Exception as exc:
        if allow_known and source.kind == "hub" and source.ref in KNOWN_CONFIGS:
            data = dict(KNOWN_CONFIGS[source.ref])
            model_type = data.pop("model_type")
            note = (
                f"the hub is unreachable: using peftlab's built-in configuration of {source.ref} "
                "(random weights; parameter counts are exact, scores are meaningless)"
            )
            return AutoConfig.for_model(model_type, **data), note
        raise _hub_error(source, exc) from None


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer for a model source (the tiny built-in vocabulary for random models)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    ref = source.tokenizer or (source.path if source.kind != "random" else None)
    try:
        if ref is None:
            tok = BertTokenizerFast(vocab=str(TINY_VOCAB), do_lower_case=True)  # transformers 5 ignores vocab_file=
        else:
            ref = resolve_model(ref).path if ref.startswith("asset:") else ref
            with _quiet_transformers():
                tok = AutoTokenizer.from_pretrained(ref, **SAFE_LOADING)
    except InputError:
        raise
    except Exception as exc:
        raise _hub_error(source, exc) from None
    return ensure_pad_token(tok)


def ensure_pad_token(tokenizer: Any) -> Any:
    """Decoder tokenizers often have no pad token; batching needs one (eos is the usual choice)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def instantiate(
    auto_cls: Any, source: ModelSource, *, tokenizer: Any = None, weights: bool = True, **kwargs: Any
) -> Any:
    """Build `auto_cls` (e.g. AutoModelForSequenceClassification) from any model source.

    Keyword arguments are configuration updates (num_labels, id2label, ...) or from_pretrained
    options (quantization_config, dtype, ...). weights=False builds the architecture only, with
    random weights (what `plan` needs; falls back to KNOWN_CONFIGS when the hub is unreachable).
    Random models get the tokenizer's vocabulary size.
    """
    config_keys = {"num_labels", "id2label", "label2id", "pad_token_id", "problem_type"}
    updates = {k: v for k, v in kwargs.items() if k in config_keys}
    load_kwargs = {k: v for k, v in kwargs.items() if k not in config_keys}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if weights and source.kind != "random":
        model = _from_pretrained(auto_cls, source, updates, load_kwargs)
        if getattr(model.config, "pad_token_id", None) is None and tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id  # decoder models batch with padding
        return model
    config, _ = load_config(source, allow_known=not weights)
    if source.kind == "random" and tokenizer is not None and not source.base and "vocab_size" not in source.overrides:
        config.vocab_size = len(tokenizer)
    for key, value in updates.items():
        setattr(config, key, value)
    if getattr(config, "pad_token_id", None) is None and tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id  # decoder models batch with padding
    import torch

    with _quiet_transformers():
        rng = torch.get_rng_state()
        model = auto_cls.from_config(config)
        if source.kind == "random":
            _same_backbone_for_every_head(model, config, rng)
    if weights and load_kwargs:
        return _reload(auto_cls, model, load_kwargs)
    return model


def _same_backbone_for_every_head(model: Any, config: Any, rng: Any) -> None:
    """Give a random model's backbone the weights a bare backbone gets from the same seed.

    Task classes initialise their modules in different orders (BERT's token classifier has no pooler),
    so without this the same seed gives each task a different random "base model": runs on different
    tasks would not share a base, as they do with pretrained weights (a mixture of experts needs it)."""
    import torch
    from transformers import AutoModel

    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if inner is None:
        return
    after = torch.get_rng_state()
    torch.set_rng_state(rng)
    bare = AutoModel.from_config(config)
    torch.set_rng_state(after)
    inner.load_state_dict(bare.state_dict(), strict=False)


def _reload(auto_cls: Any, model: Any, load_kwargs: dict[str, Any]) -> Any:
    """A random-weight model loaded again with from_pretrained options (e.g. 4-bit quantization).

    Quantizers act while a checkpoint is loaded, so the random weights are saved to a temporary
    folder first: the model is then quantized exactly as a pretrained one would be.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="peftlab-random-") as tmp, _quiet_transformers():
        model.save_pretrained(tmp)
        loaded = auto_cls.from_pretrained(tmp, **load_kwargs)
    loaded.name_or_path = ""  # built from a config, as before: not the (deleted) temporary folder
    return loaded


# Model code from a hub repository never runs, and weights load only from safetensors files (a pickled
# .bin checkpoint can run code when it is unpickled): a model file is input like any other.
SAFE_LOADING: dict[str, Any] = {"trust_remote_code": False}


def _from_pretrained(auto_cls: Any, source: ModelSource, updates: dict[str, Any], load_kwargs: dict[str, Any]) -> Any:
    try:
        with _quiet_transformers():
            return auto_cls.from_pretrained(source.path, **updates, **SAFE_LOADING, use_safetensors=True, **load_kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from None
