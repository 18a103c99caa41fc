"""Faster forward passes for a loaded Qwen2.5-VL, installed in place on the model's modules.

`install_fast_path(model)` replaces, on the instances of one loaded model (never on the
classes, so other models in the process keep the library's code):

  - vision attention: the Hugging Face SDPA path loops over the windows of every image, one
    attention call per window (16 windows per 448 px image, 28 windowed blocks). Windows of the
    same length are batched into one `scaled_dot_product_attention` call; same-size images give
    equal windows, so a batch of 448 px images takes one call per block. Mixed lengths (e.g.
    504 px images: 8x8, 8x4 and 4x4 windows) take one call per distinct length. The grouping is
    computed once per `cu_seqlens` tensor, i.e. twice per forward, not once per block;
  - patch embedding: the Conv3d whose kernel equals its stride is one matrix product over the
    flattened patches (the same arithmetic without the 3-D convolution's layout overhead);
  - 3-D rotary position ids: the library builds them with a Python loop over the rows of the
    batch; rows with identical tokens, mask and image grid (every row of a scoring batch of
    same-size images) get the first row's result broadcast instead;
  - optionally (`compile_vision=True`), the element-wise work of every vision block fused by
    `torch.compile`: the first RMSNorm, the float32 rotary embedding of queries and keys, and
    RMSNorm + SwiGLU MLP + residual. Each is one compiled function shared by all blocks
    (weights are arguments), so it compiles once per input shape, not once per block.

The numerics are the library's up to bf16 rounding order: the same rotary embedding (in
float32), the same softmax scale, the same norms. LLaVA models are returned untouched, with the
reason recorded.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

__all__ = ["install_fast_path", "uninstall_fast_path", "build_random_vlm", "FastPathError", "vision_attention_groups"]


class FastPathError(RuntimeError):
    """The model's modules do not have the structure the fast path replaces."""


# --------------------------------------------------------------------------- vision attention


@dataclass
class _Group:
    length: int
    count: int
    index: Any = None  # [count, length] token indices; None when the group covers all tokens in order


@dataclass
class _PlanCache:
    """Attention groups per `cu_seqlens` tensor, held by identity (the tensor stays referenced)."""

    entries: list = field(default_factory=list)
    misses: int = 0

    def get(self, cu_seqlens) -> list[_Group]:
        for tensor, plan in self.entries:
            if tensor is cu_seqlens:
                return plan
        plan = vision_attention_groups(cu_seqlens)
        self.misses += 1
        self.entries.append((cu_seqlens, plan))
        del self.entries[:-4]  # window and full-attention boundaries of the current forward, and spare
        return plan


def vision_attention_groups(cu_seqlens) -> list[_Group]:
    """Group the chunks delimited by `cu_seqlens` by length: one batched attention call per group."""
    import torch

    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    by_length: dict[int, list[int]] = {}
    for s, n in zip(starts, lengths):
        if n > 0:
            by_length.setdefault(n, []).append(s)
    if len(by_length) == 1:
        (n, ss), = by_length.items()
        if ss == list(range(bounds[0], bounds[0] + n * len(ss), n)) and bounds[0] == 0:
            return [_Group(n, len(ss))]
    device = cu_seqlens.device
    groups = []
    for n, ss in sorted(by_length.items()):
        index = torch.tensor(ss, device=device, dtype=torch.long)[:, None] + torch.arange(n, device=device)
        groups.append(_Group(n, len(ss), index))
    return groups


def _make_vision_attention_forward(rotary, cache: _PlanCache):
    import torch
    import torch.nn.functional as F

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        n = hidden_states.shape[0]
        heads = self.num_heads
        qkv = self.qkv(hidden_states).view(n, 3, heads, -1)
        q, k, v = qkv.unbind(1)  # [n, H, D]
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)
        d = q.shape[-1]
        out = None
        for g in cache.get(cu_seqlens):
            if g.index is None:
                qg, kg, vg = (t.view(g.count, g.length, heads, d).transpose(1, 2) for t in (q, k, v))
            else:
                qg, kg, vg = (t[g.index].transpose(1, 2) for t in (q, k, v))  # [c, H, L, D]
            o = F.scaled_dot_product_attention(qg, kg, vg, scale=self.scaling).transpose(1, 2)  # [c, L, H, D]
            if g.index is None:
                out = o.reshape(n, heads * d)
            else:
                if out is None:
                    out = torch.empty(n, heads, d, dtype=o.dtype, device=o.device)
                out[g.index.reshape(-1)] = o.reshape(-1, heads, d)
        if out.dim() == 3:
            out = out.reshape(n, heads * d)
        return self.proj(out)

    return forward


def _patch_embed_forward(self, hidden_states):
    import torch.nn.functional as F

    w = self.proj.weight  # [E, C, T, P, P]; the kernel equals the stride: one matrix product
    x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
    return F.linear(x, w.reshape(w.shape[0], -1), self.proj.bias)


# --------------------------------------------------------------------------- rotary position ids


def _make_rope_index(original, stats: dict):
    import torch

    def get_rope_index(input_ids, *args, **kwargs):
        grid = kwargs.get("image_grid_thw")
        mask = kwargs.get("attention_mask")
        mm = kwargs.get("mm_token_type_ids")
        b = input_ids.shape[0]
        simple = (
            not args
            and b > 1
            and kwargs.get("video_grid_thw") is None
            and grid is not None
            and grid.shape[0] == b
            and set(kwargs) <= {"image_grid_thw", "video_grid_thw", "attention_mask", "mm_token_type_ids",
                                "second_per_grid_ts"}
        )
        if simple:
            same = bool((input_ids == input_ids[:1]).all()) and bool((grid == grid[:1]).all())
            if same and mask is not None:
                same = bool((mask == mask[:1]).all())
            if same and mm is not None:
                same = bool((mm == mm[:1]).all())
            if same:
                one = dict(kwargs)
                one["image_grid_thw"] = grid[:1]
                if mask is not None:
                    one["attention_mask"] = mask[:1]
                if mm is not None:
                    one["mm_token_type_ids"] = mm[:1]
                pos, delta = original(input_ids[:1], **one)
                stats["rope_index_broadcast"] += 1
                return pos.expand(pos.shape[0], b, pos.shape[2]), delta.expand(b, *delta.shape[1:])
        stats["rope_index_per_row"] += 1
        return original(input_ids, *args, **kwargs)

    return get_rope_index


# --------------------------------------------------------------------------- fused vision MLP


_COMPILED: dict[str, Any] = {}


def _residual_mlp(h, norm_w, eps: float, gw, gb, uw, ub, dw, db):
    """h + down(silu(gate(norm(h))) * up(norm(h))), norm = RMSNorm in float32 as the library does it."""
    import torch
    import torch.nn.functional as F

    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x = norm_w * x.to(h.dtype)
    return h + F.linear(F.silu(F.linear(x, gw, gb)) * F.linear(x, uw, ub), dw, db)


def _rms_norm(h, weight, eps: float):
    """RMSNorm in float32, as the library computes it."""
    import torch

    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _make_block_forward(fused_mlp, fused_norm):
    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        x = fused_norm(hidden_states, self.norm1.weight, float(self.norm1.variance_epsilon))
        h = hidden_states + self.attn(x, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        m = self.mlp
        return fused_mlp(
            h, self.norm2.weight, float(self.norm2.variance_epsilon),
            m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight, m.up_proj.bias, m.down_proj.weight, m.down_proj.bias,
        )

    return forward


# --------------------------------------------------------------------------- entry point


def _model_type(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", type(model).__name__))


def _unwrap(model):
    """The transformers model underneath a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def install_fast_path(model, *, compile_vision: bool = False, rope_broadcast: bool = True) -> dict:
    """Install the faster vision attention, patch embedding and position ids on a loaded model.

    Works on a Qwen2.5-VL model (plain, or under a PEFT wrapper, or with 4-bit language weights:
    only vision modules and the position-id builder are replaced). Returns a record of what was
    installed (and, for another family, why nothing was). Installing twice is an error.
    """
    base = _unwrap(model)
    family = _model_type(base)
    record: dict[str, Any] = {"family": family, "installed": [], "skipped": {}, "stats": None}
    if family != "qwen2_5_vl":
        record["skipped"]["all"] = f"no fast path for model_type {family!r}: the library's forward is used"
        return record
    if getattr(base, "_saec_fast_path", None) is not None:
        raise FastPathError("the fast path is already installed on this model")

    inner = getattr(base, "model", base)
    visual = getattr(inner, "visual", None)
    if visual is None or not hasattr(visual, "blocks") or not hasattr(visual, "patch_embed"):
        raise FastPathError(f"{type(base).__name__} has no vision tower with blocks and patch_embed")
    attn0 = visual.blocks[0].attn
    for name in ("qkv", "proj", "num_heads", "scaling"):
        if not hasattr(attn0, name):
            raise FastPathError(f"vision attention {type(attn0).__name__} lacks {name!r}")
    module = sys.modules[type(attn0).__module__]
    rotary = getattr(module, "apply_rotary_pos_emb_vision", None)
    if rotary is None:
        raise FastPathError(f"{module.__name__} has no apply_rotary_pos_emb_vision")

    if compile_vision:
        import torch

        mlp0 = visual.blocks[0].mlp
        act = getattr(getattr(visual, "config", None), "hidden_act", "silu")
        if act != "silu" or not all(hasattr(mlp0, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise FastPathError(f"compile_vision needs a SwiGLU (silu) vision MLP, found {type(mlp0).__name__} / {act}")
        if not hasattr(visual.blocks[0].norm1, "variance_epsilon"):
            raise FastPathError("compile_vision needs RMSNorm vision norms")
        for name, fn in (("residual_mlp", _residual_mlp), ("rms_norm", _rms_norm), ("rotary", rotary)):
            if name not in _COMPILED:
                _COMPILED[name] = torch.compile(fn, dynamic=None)
        rotary = _COMPILED["rotary"]

    cache = _PlanCache()
    attn_forward = _make_vision_attention_forward(rotary, cache)
    for blk in visual.blocks:
        blk.attn.forward = types.MethodType(attn_forward, blk.attn)
    record["installed"].append("vision_attention_batched_windows")

    proj = visual.patch_embed.proj
    if tuple(proj.kernel_size) == tuple(proj.stride) and tuple(proj.padding) == (0, 0, 0):
        visual.patch_embed.forward = types.MethodType(_patch_embed_forward, visual.patch_embed)
        record["installed"].append("patch_embed_as_matmul")
    else:
        record["skipped"]["patch_embed_as_matmul"] = "convolution kernel differs from its stride"

    stats = {"rope_index_broadcast": 0, "rope_index_per_row": 0}
    if rope_broadcast and hasattr(inner, "get_rope_index"):
        inner.get_rope_index = _make_rope_index(inner.get_rope_index, stats)
        record["installed"].append("rope_index_broadcast")
    elif rope_broadcast:
        record["skipped"]["rope_index_broadcast"] = "model has no get_rope_index"

    if compile_vision:
        block_forward = _make_block_forward(_COMPILED["residual_mlp"], _COMPILED["rms_norm"])
        for blk in visual.blocks:
            blk.forward = types.MethodType(block_forward, blk)
        record["installed"].append("vision_norm_rotary_mlp_compiled")

    record["stats"] = stats
    record["plan_cache"] = cache
    base._saec_fast_path = record
    return record


def uninstall_fast_path(model) -> None:
    """Remove what `install_fast_path` put on the model's instances: the library's code runs again."""
    base = _unwrap(model)
    if getattr(base, "_saec_fast_path", None) is None:
        raise FastPathError("no fast path is installed on this model")
    inner = getattr(base, "model", base)
    visual = inner.visual
    for blk in visual.blocks:
        blk.__dict__.pop("forward", None)
        blk.attn.__dict__.pop("forward", None)
    visual.patch_embed.__dict__.pop("forward", None)
    inner.__dict__.pop("get_rope_index", None)
    base._saec_fast_path = None


# --------------------------------------------------------------------------- random-weight models


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
