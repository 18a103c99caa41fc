"""Random-weight models of a weightless Hugging Face folder: what the benchmarks and the numerics
tests run where no published weights can be downloaded. Real scoring loads weights through
`saec.tasks.cloud.models.load_vlm`."""
from __future__ import annotations


def build_random_vlm(folder, *, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                     text_overrides: dict | None = None, vision_overrides: dict | None = None):
    """A `LoadedVLM` of the architecture in `folder`'s config.json with random weights.

    The processor (tokenizer, image processor, chat template) is the folder's own, so token
    counts are the real ones. Overrides change sub-config fields (e.g. depth for tests on a CPU).
    For benchmarks and numerics tests of weightless model folders; real scoring loads weights
    through `models.load_vlm`.
    """
    from pathlib import Path

    import torch
    from transformers import AutoConfig

    from saec.artifacts.hashing import canonical_json, sha256_text
    from saec.tasks.cloud.models import LoadedVLM, detect_family, load_processor, model_class

    folder = Path(folder).resolve()
    family = detect_family(folder)
    cfg = AutoConfig.from_pretrained(folder)
    for sub, overrides in (("text_config", text_overrides), ("vision_config", vision_overrides)):
        for key, value in (overrides or {}).items():
            target = getattr(cfg, sub)
            if not hasattr(target, key):
                raise ValueError(f"{sub} of {folder.name} has no field {key!r}")
            setattr(target, key, value)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    dev = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = model_class(family)._from_config(cfg, dtype=torch_dtype, attn_implementation="sdpa")
    model.eval()
    ident = sha256_text(canonical_json({"config": cfg.to_dict(), "seed": seed, "random": True}))
    return LoadedVLM(
        model=model, processor=load_processor(folder), family=family, model_dir=folder, model_id=ident,
        adapter_dir=None, adapter_id=None, device=dev, dtype=torch_dtype, quantization="none",
        info={"torch_dtype": dtype, "attn_implementation": "sdpa", "random_weights": True},
    )
