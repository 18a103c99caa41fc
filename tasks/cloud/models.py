"""Loading the cloud models: folders or hub ids, adapters, precision, placement, 4-bit NF4.

One loader serves the embedded tiny model, Qwen2.5-VL-7B-Instruct and LLaVA-1.5: the model
family is read from `config.json` (`model_type`), never guessed from a path. Identity hashes
of the base model and of the adapter go into every output table.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saec.artifacts.hashing import canonical_json, hash_tree, sha256_file, sha256_text
from saec.tasks.cloud.config import Family, ModelLoadConfig
from saec.errors import ActionableError

SUPPORTED_FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "llava")
ADAPTER_RECORD = "saec_adapter.json"


class ModelLoadError(ActionableError, RuntimeError):
    """A model or adapter cannot be loaded; the message says which file or setting is at fault."""


# --------------------------------------------------------------------------- folders and files


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model_dir(model: str | Path) -> Path:
    """A local folder as is; a hub id through the local Hugging Face cache (never a download when offline)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    text = str(model)
    if path.exists():
        raise ModelLoadError(f"model path {text!r} is a file, not a model folder")
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"model folder {text!r} does not exist (and it is not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download

    offline = hf_offline()
    try:
        return Path(snapshot_download(repo_id=text, local_files_only=offline)).resolve()
    except Exception as exc:  # LocalEntryNotFoundError, network errors, gated repos
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set, nothing is downloaded)" if offline else "the hub"
        raise ModelLoadError(f"model {text!r} is not a local folder and could not be found in {where}: {exc}") from exc


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder; a clear error when any is missing."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a safetensors index (no weight_map): {exc}") from exc
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ModelLoadError(
                f"model folder {folder} lists {len(shards)} weight shards in model.safetensors.index.json but "
                f"{len(missing)} are missing: {shown}. A folder with config and tokenizer only is weightless: "
                "put the *.safetensors shards beside the index."
            )
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise ModelLoadError(
        f"model folder {folder} has no *.safetensors weights (neither model.safetensors nor "
        "model.safetensors.index.json with its shards); only safetensors checkpoints are loaded"
    )


def read_model_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json")
    return json.loads(cfg_path.read_text())


def detect_family(folder: Path) -> Family:
    model_type = read_model_config(folder).get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"model {folder} has model_type {model_type!r}; the cloud branch supports {list(SUPPORTED_FAMILIES)}"
        )
    return model_type  # type: ignore[return-value]


_IDENTITY_CACHE: dict[tuple, str] = {}


def model_identity(folder: Path) -> str:
    """Identity of a base model: config.json plus its weights.

    A sharded checkpoint is identified by its index and each shard's name and size (hashing
    tens of GB at every load would cost minutes); a single weights file by its sha256.
    """
    folder = Path(folder).resolve()
    files = weight_files(folder)
    key = (str(folder), *((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in [folder / "config.json", *files]))
    if key in _IDENTITY_CACHE:
        return _IDENTITY_CACHE[key]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weights: Any = {"index": sha256_file(index), "shards": [[p.name, p.stat().st_size] for p in files]}
    else:
        weights = {p.name: sha256_file(p) for p in files}
    ident = sha256_text(canonical_json({"config": sha256_file(folder / "config.json"), "weights": weights}))
    _IDENTITY_CACHE[key] = ident
    return ident


def adapter_identity(folder: Path) -> str:
    return hash_tree(Path(folder))


# --------------------------------------------------------------------------- families


FAMILY_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}

# Modules kept out of 4-bit quantization: the vision side (it must stay trainable and precise)
# and the output layer. Names are the loaded model's module paths, matched from the start.
QUANT_SKIP_MODULES = {
    "qwen2_5_vl": ["model.visual", "lm_head"],
    "llava": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
}

# The loaded model's parameter names versus the published checkpoints' names.
_CHECKPOINT_RENAMES = {
    "qwen2_5_vl": [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")],
    "llava": [
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.vision_model\.", "vision_tower.vision_model."),
        (r"^model\.vision_tower\.", "vision_tower.vision_model."),  # newer releases drop the inner wrapper
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    ],
}

VISION_MERGER = {"qwen2_5_vl": "model.visual.merger", "llava": "model.multi_modal_projector"}
VISION_TOWER = {"qwen2_5_vl": "model.visual", "llava": "model.vision_tower"}
OUTPUT_LAYER = {"qwen2_5_vl": ["lm_head", "model.language_model.norm"], "llava": ["lm_head", "model.language_model.norm"]}


def to_checkpoint_name(name: str, family: str) -> str:
    """The published checkpoint's name of a loaded model's parameter (e.g. for index look-ups)."""
    for pattern, repl in _CHECKPOINT_RENAMES[family]:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def lora_target_regex(mlp: bool) -> str:
    """LoRA targets: the language model's attention projections (and MLP), never the vision tower's."""
    leaves = "self_attn\\.(q_proj|k_proj|v_proj|o_proj)"
    if mlp:
        leaves = f"({leaves}|mlp\\.(gate_proj|up_proj|down_proj))"
    return rf"model\.language_model\.layers\.\d+\.{leaves}"


def model_class(family: str):
    import transformers

    return getattr(transformers, FAMILY_CLASSES[family])


# --------------------------------------------------------------------------- numerics and placement


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device) -> "Any":
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_quantization(quantization: str, device) -> str:
    if quantization == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return quantization


def nf4_config(family: str, compute_dtype):
    """4-bit NF4 with double quantization; the vision side and the output layer stay unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(QUANT_SKIP_MODULES[family]),
    )


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedVLM:
    """A loaded model with everything the scorer and trainer need to know about it."""

    model: Any
    processor: Any
    family: Family
    model_dir: Path
    model_id: str
    adapter_dir: Path | None
    adapter_id: str | None
    device: Any
    dtype: Any
    quantization: str
    info: dict = field(default_factory=dict)

    @property
    def base(self):
        """The transformers model underneath a PEFT wrapper (LoRA layers stay injected in it)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model


def load_processor(folder: Path):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the processor (tokenizer, image processor, chat template) of {folder}: {exc}") from exc


def load_vlm(cfg: ModelLoadConfig) -> LoadedVLM:
    """Load processor, base model and optional adapter as `cfg` says; fail with the reason, never fall back."""
    folder = resolve_model_dir(cfg.model)
    family = detect_family(folder)
    weight_files(folder)  # a weightless folder fails here, naming the missing files
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quant = resolve_quantization(cfg.quantization, device)
    processor = load_processor(folder)

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(family, dtype)
        kwargs["device_map"] = {"": str(device) if device.type == "cpu" else device.index or 0}
    try:
        model = model_class(family).from_pretrained(folder, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model weights from {folder}: {exc}") from exc
    if quant != "nf4":
        model = model.to(device)
    model.eval()

    adapter_dir = adapter_id = None
    model_id = model_identity(folder)
    if cfg.adapter:
        adapter_dir = Path(cfg.adapter).expanduser().resolve()
        model = attach_adapter(model, adapter_dir, model_id=model_id, model_dir=folder)
        adapter_id = adapter_identity(adapter_dir)
    return LoadedVLM(
        model=model,
        processor=processor,
        family=family,
        model_dir=folder,
        model_id=model_id,
        adapter_dir=adapter_dir,
        adapter_id=adapter_id,
        device=device,
        dtype=dtype,
        quantization=quant,
        info={"torch_dtype": str(dtype).removeprefix("torch."), "attn_implementation": cfg.attn_implementation},
    )


def attach_adapter(model, adapter_dir: Path, *, model_id: str, model_dir: Path, is_trainable: bool = False):
    """Wrap `model` with the PEFT adapter in `adapter_dir`, after checking it was trained on this base."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter folder {adapter_dir} has no adapter_config.json")
    record_path = adapter_dir / ADAPTER_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("base_model_id") != model_id:
            raise ModelLoadError(
                f"adapter {adapter_dir} was trained on base model {record.get('base_model_dir')} "
                f"(identity {str(record.get('base_model_id'))[:12]}), but the base model loaded is {model_dir} "
                f"(identity {model_id[:12]}); load the adapter with the model it was trained on"
            )
    try:
        with warnings.catch_warnings():  # PEFT reads a property that transformers has renamed
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    except Exception as exc:
        raise ModelLoadError(
            f"adapter {adapter_dir} does not fit the base model {model_dir} (parameter names or shapes differ): {exc}"
        ) from exc
