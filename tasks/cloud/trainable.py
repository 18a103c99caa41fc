"""What learns: LoRA adapters through PEFT, plus the merger, the vision tower or the output layer as
the recipe says, on a loaded model (quantized or not)."""
from __future__ import annotations

import warnings


from saec.tasks.cloud.config import CloudTrainConfig
from saec.tasks.cloud.models import (
    QUANT_SKIP_MODULES,
    VISION_MERGER,
    VISION_TOWER,
    OUTPUT_LAYER,
    LoadedVLM,
    lora_target_regex,
)


def setup_trainable(loaded: LoadedVLM, cfg: CloudTrainConfig):
    """Make the chosen parameters trainable; returns the (possibly PEFT-wrapped) model."""
    import torch

    model = loaded.model
    family = loaded.family
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.trainable == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        drop_input_grad_hooks(model)
        return model

    from peft import LoraConfig, get_peft_model

    modules_to_save = {
        "lora": None,
        "lora+merger": [VISION_MERGER[family]],
        "lora+vision": [VISION_TOWER[family]],
    }[cfg.trainable]
    if cfg.train_output_layer:
        modules_to_save = (modules_to_save or []) + list(OUTPUT_LAYER[family])
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=lora_target_regex(cfg.lora_mlp),
        modules_to_save=modules_to_save,
    )
    with warnings.catch_warnings():  # PEFT reads a property that transformers has renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora)
    drop_input_grad_hooks(model)
    _check_trainable(model, loaded, cfg)
    # Trainable weights in float32 (LoRA is already); the frozen base keeps its dtype.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def drop_input_grad_hooks(model) -> int:
    """Remove the hooks that make every input embedding's output require grad.

    transformers (when checkpointing is enabled) and PEFT hook every input embedding, the vision
    tower's patch embedding included. That keeps a frozen vision tower in the autograd graph (its
    activations stored, or recomputed under checkpointing) although nothing in it trains.
    Non-reentrant checkpointing needs no such hook, so none is kept.
    """
    removed = 0
    for module in model.modules():
        for key, fn in list(module._forward_hooks.items()):
            if getattr(fn, "__name__", "") in {"make_inputs_require_grads", "make_inputs_require_grad"}:
                del module._forward_hooks[key]
                removed += 1
    return removed


def _check_trainable(model, loaded: LoadedVLM, cfg: CloudTrainConfig) -> None:
    """LoRA sits on every language-model projection asked for and nowhere else; saved modules are unquantized."""
    from peft.tuners.lora import LoraLayer

    lora_names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    vision = VISION_TOWER[loaded.family]
    stray = [n for n in lora_names if f".{vision}." in f".{n}" or ".visual." in n or ".vision_tower." in n]
    if stray:
        raise RuntimeError(f"LoRA landed inside the vision tower: {stray[:4]}")
    text_cfg = loaded.base.config.get_text_config()
    expected = text_cfg.num_hidden_layers * (7 if cfg.lora_mlp else 4)
    if len(lora_names) != expected:
        raise RuntimeError(f"LoRA wraps {len(lora_names)} modules, expected {expected}: {lora_names[:8]}")
    if loaded.quantization == "nf4":
        import bitsandbytes as bnb

        for prefix in QUANT_SKIP_MODULES[loaded.family]:
            quantized = [n for n, m in model.named_modules() if f".{prefix}." in f".{n}." and isinstance(m, bnb.nn.Linear4bit)]
            if quantized:
                raise RuntimeError(f"{prefix} must not be 4-bit quantized, but {quantized[:3]} are")
