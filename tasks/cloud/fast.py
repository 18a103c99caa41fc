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
  - vision metadata: the rotary position ids, attention and window boundaries of the vision
    tower, which the library builds with a Python loop over the images of every batch, are
    built once per `grid_thw` tensor (the engine reuses one per batch size) and passed to the
    library's forward as the precomputed tensors it accepts;
  - 3-D rotary position ids: the library builds them with a Python loop over the rows of the
    batch; rows with identical tokens, mask and image grid (every row of a scoring batch of
    same-size images) get the first row's result broadcast instead;
  - optionally (`compile_vision=True`), the element-wise work of every vision block fused by
    `torch.compile`: the first RMSNorm, the float32 rotary embedding of queries and keys, and
    residual + RMSNorm + SwiGLU MLP + residual, gate and up as one matrix product whose width
    is padded with zeros to a multiple of 128 (3420 -> 3456 for the 7B tower: aligned rows for
    the matrix kernels, the same values);
  - optionally (`compile_language=True`), every decoder layer of the language model as one
    compiled function: RMSNorm, q/k/v as one product, rotary embedding, causal SDPA (grouped
    keys in the kernel), o_proj, residual, RMSNorm, gate/up as one product, SiLU * up, down,
    residual. The modules' q/k/v and gate/up weights become views of the fused weights (no
    second copy). Within `keep_positions` the last layer computes keys and values for every
    token but queries, attention output and MLP only at the scored positions. Calls with a KV
    cache, attention weights or gradients run the library's layer.

Compiled functions take the weights as arguments, so one compilation serves every block or
layer; the batch and token dimensions are compiled as symbolic sizes and the model's widths as
constants, so one compilation also serves every batch and image size.

The numerics are the library's up to bf16 rounding order: the same rotary embedding (in
float32 for the vision tower), the same softmax scale, the same norms. LLaVA models are
returned untouched, with the reason recorded.
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["install_fast_path", "uninstall_fast_path", "FastPathError", "vision_attention_groups",
           "keep_positions"]


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


# --------------------------------------------------------------------------- vision metadata per grid


_VISION_META_KEYS = ("position_ids", "cu_seqlens", "max_seqlen", "window_index", "cu_window_seqlens",
                     "max_window_seqlen")


def _vision_metadata_supported(visual) -> str | None:
    """Why the vision tower cannot take precomputed per-grid tensors (None when it can)."""
    import inspect

    try:
        from transformers import vision_utils
    except ImportError:
        return "the library has no transformers.vision_utils"
    if not all(hasattr(vision_utils, n) for n in ("get_vision_position_ids", "get_vision_attention_seqlens",
                                                  "get_vision_window_index")):
        return "transformers.vision_utils lacks the window-index helpers"
    try:
        source = inspect.getsource(type(visual).forward)
    except (OSError, TypeError):
        return "the vision forward's source is not available"
    if "get_vision_window_index(" not in source or "kwargs=kwargs" not in source:
        return "the vision forward does not read precomputed tensors from its keyword arguments"
    return None


def _vision_metadata(visual, grid_thw) -> dict:
    """Position ids, attention and window boundaries of `grid_thw`, by the library's own helpers."""
    from transformers import vision_utils as vu
    from transformers.utils.generic import get_max_seqlen

    merge = visual.spatial_merge_size
    meta = {"position_ids": vu.get_vision_position_ids(grid_thw, merge)}
    meta["cu_seqlens"], max_seqlen = vu.get_vision_attention_seqlens(grid_thw, visual.config)
    meta["window_index"], meta["cu_window_seqlens"] = vu.get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size)
    max_window = get_max_seqlen(meta["cu_window_seqlens"], visual.config)
    for key, value in (("max_seqlen", max_seqlen), ("max_window_seqlen", max_window)):
        if value is not None:
            meta[key] = value
    return meta


def _make_visual_forward(library_forward, stats: dict):
    """The vision tower's forward with its per-grid tensors computed once per `grid_thw` tensor.

    The library builds them with a Python loop over the images of the batch and reads the grid
    back from the device; the scoring engine passes the same grid tensor for every batch of one
    size, so they are built once and handed to the library's forward as precomputed tensors.
    """
    entries: list = []

    def forward(self, hidden_states, grid_thw=None, **kwargs):
        if grid_thw is None or any(k in kwargs for k in _VISION_META_KEYS):
            return library_forward(hidden_states, grid_thw=grid_thw, **kwargs)
        meta = next((m for g, m in entries if g is grid_thw), None)
        if meta is None:
            meta = _vision_metadata(self, grid_thw)
            entries.append((grid_thw, meta))  # the entry holds the tensor: its identity stays unique
            del entries[:-4]
            stats["vision_metadata_built"] += 1
        else:
            stats["vision_metadata_reused"] += 1
        return library_forward(hidden_states, grid_thw=grid_thw, **meta, **kwargs)

    return forward


# --------------------------------------------------------------------------- rotary position ids


def _make_rope_index(original, stats: dict):
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


def _compiled(name: str, fn, compiler=None, rows: dict[int, int | list[int]] | None = None):
    """`fn` compiled once per process with torch.compile (weights are arguments, so one compiled
    function serves every block or layer), or passed through `compiler` when one is given.

    `rows` names, per argument position, the dimensions that change with the batch (images,
    tokens): they are compiled as symbolic sizes, so one compilation serves every batch and
    image size, while all other sizes (the model's widths) stay static and the generated
    kernels are specialised to them.
    """
    if compiler is not None:
        return compiler(fn)
    if name not in _COMPILED:
        import torch

        compiled = torch.compile(fn)
        marks = tuple((rows or {}).items())

        def call(*args):
            for i, dims in marks:
                if args[i] is not None:
                    torch._dynamo.maybe_mark_dynamic(args[i], dims)
            return compiled(*args)

        _COMPILED[name] = call
    return _COMPILED[name]


def _residual_mlp(x, attn, norm_w, eps: float, wgu, bgu, wd, bd):
    """h + down(silu(gate(norm(h))) * up(norm(h))) with h = x + attn (the attention's residual),
    norm = RMSNorm in float32 as the library does it. Serves the vision blocks and the decoder
    layers (which have no MLP biases: `bgu` and `bd` None).

    gate and up are one matrix product (`wgu` holds both, in the vision blocks each padded with
    zero rows to an aligned width and `wd` with the matching zero columns), which changes no value.
    """
    import torch.nn.functional as F

    h = x + attn
    g, u = F.linear(_rms_norm(h, norm_w, eps), wgu, bgu).chunk(2, dim=-1)
    return h + F.linear(F.silu(g) * u, wd, bd)


def _rms_norm(h, weight, eps: float):
    """RMSNorm in float32, as the library computes it."""
    import torch

    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _make_block_forward(fused_mlp, fused_norm):
    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        x = fused_norm(hidden_states, self.norm1.weight, float(self.norm1.variance_epsilon))
        attn = self.attn(x, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        return fused_mlp(hidden_states, attn, self.norm2.weight, float(self.norm2.variance_epsilon), *self._saec_mlp)

    return forward


ALIGN = 128  # matrix widths rounded up to this many elements for the fused products


def _fused_rows(*linears, align: int = 1):
    """One weight (and bias) holding the rows of `linears` one after the other, each block padded
    with zero rows to a multiple of `align`. The modules' weights become views of it (each block
    of rows is contiguous), so the fused copy costs no memory and the modules work as before.
    """
    import torch

    w0 = linears[0].weight
    widths = [m.weight.shape[0] for m in linears]
    padded = [-(-n // align) * align for n in widths]
    has_bias = [m.bias is not None for m in linears]
    with torch.no_grad():
        w = torch.zeros(sum(padded), w0.shape[1], dtype=w0.dtype, device=w0.device)
        b = torch.zeros(sum(padded), dtype=w0.dtype, device=w0.device) if any(has_bias) else None
        start = 0
        for m, n, n_pad in zip(linears, widths, padded):
            w[start : start + n] = m.weight
            if m.bias is not None:
                b[start : start + n] = m.bias
            start += n_pad
        start = 0
        for m, n, n_pad in zip(linears, widths, padded):
            m.weight = torch.nn.Parameter(w[start : start + n], requires_grad=False)
            if m.bias is not None:
                m.bias = torch.nn.Parameter(b[start : start + n], requires_grad=False)
            start += n_pad
    return w, b


def _padded_columns(linear, width: int):
    """`linear`'s weight with zero columns appended up to `width` inputs (a copy), and its bias."""
    import torch

    w = linear.weight
    with torch.no_grad():
        out = torch.zeros(w.shape[0], width, dtype=w.dtype, device=w.device)
        out[:, : w.shape[1]] = w
    return out, linear.bias


# --------------------------------------------------------------------------- language model layers


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _split_heads(qkv, b: int, t: int, heads: int, kv_heads: int, d: int):
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return (q.view(b, t, heads, d).transpose(1, 2), k.view(b, t, kv_heads, d).transpose(1, 2),
            v.view(b, t, kv_heads, d).transpose(1, 2))


def _attend(q, k, v, mask, scaling: float, causal: bool):
    """SDPA as the library calls it: grouped keys in the kernel without a mask, repeated with one."""
    import torch.nn.functional as F

    rep = q.shape[1] // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling, enable_gqa=rep > 1)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def _text_layer(h, cos, sin, mask, ln1, eps1: float, wqkv, bqkv, wo, ln2, eps2: float, wgu, wd,
                heads: int, kv_heads: int, scaling: float):
    """One decoder layer: RMSNorm, fused q/k/v, rotary, causal SDPA, o_proj, residual, RMSNorm,
    fused gate/up, SiLU * up, down, residual. cos/sin: [B, T, D] (3-D sections already merged)."""
    import torch.nn.functional as F

    b, t, _ = h.shape
    d = cos.shape[-1]
    q, k, v = _split_heads(F.linear(_rms_norm(h, ln1, eps1), wqkv, bqkv), b, t, heads, kv_heads, d)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    o = _attend(q, k, v, mask, scaling, causal=True).transpose(1, 2).reshape(b, t, heads * d)
    return _residual_mlp(h, F.linear(o, wo), ln2, eps2, wgu, None, wd, None)


def _text_layer_at(h, positions, cos, sin, mask, ln1, eps1: float, wqkv, bqkv, wo, ln2, eps2: float, wgu, wd,
                   heads: int, kv_heads: int, scaling: float):
    """The same layer with outputs at `positions` ([B, K]) only: keys and values for every token,
    queries, attention output and MLP for the K kept ones. Returns [B, K, H]."""
    import torch
    import torch.nn.functional as F

    b, t, _ = h.shape
    d = cos.shape[-1]
    rows = torch.arange(b, device=h.device)[:, None]
    x = _rms_norm(h, ln1, eps1)
    nq = heads * d
    kv = F.linear(x, wqkv[nq:], None if bqkv is None else bqkv[nq:])
    k, v = (z.view(b, t, kv_heads, d).transpose(1, 2) for z in kv.split([kv_heads * d, kv_heads * d], dim=-1))
    kept = positions.shape[1]
    q = F.linear(x[rows, positions], wqkv[:nq], None if bqkv is None else bqkv[:nq])
    q = q.view(b, kept, heads, d).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    k = k * c + _rotate_half(k) * s
    cq, sq = cos[rows, positions].unsqueeze(1), sin[rows, positions].unsqueeze(1)
    q = q * cq + _rotate_half(q) * sq
    if mask is None:  # causal: a kept position sees every key up to itself
        allowed = torch.arange(t, device=h.device)[None, None, :] <= positions[:, :, None]
    else:
        allowed = mask[rows, 0, positions]  # [B, K, T]: the rows of the library's 4-D mask
    o = _attend(q, k, v, allowed.unsqueeze(1), scaling, causal=False).transpose(1, 2).reshape(b, kept, nq)
    return _residual_mlp(h[rows, positions], F.linear(o, wo), ln2, eps2, wgu, None, wd, None)


def _language_unsupported(inner) -> str | None:
    """Why the language layers cannot take the fused path (None when they can)."""
    import torch

    lm = getattr(inner, "language_model", None)
    layers = getattr(lm, "layers", None)
    if lm is None or not layers:
        return "no language_model.layers"
    cfg = lm.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r}: the fused layers take the 4-D mask of sdpa/eager"
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not torch.nn.Linear for m in linears):
            kinds = sorted({type(m).__name__ for m in linears})
            return f"layer {i}: projections are {kinds}, not plain Linear (quantized or adapter layers)"
        if any(m.bias is not None for m in linears[3:]):
            return f"layer {i}: o_proj or MLP with bias"
        if not all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return f"layer {i}: norms are not RMSNorm"
    return None


def _install_language(inner, compiled: dict) -> dict:
    """Replace every decoder layer's forward by one compiled layer function (weights as arguments).

    The fast forward runs when nothing but the prompt is asked of a layer: no cache, no
    attention weights, no gradient. Anything else (generation with a KV cache, training) goes
    to the library's forward. The last layer computes only the positions named by
    `keep_positions` when that is in effect.
    """
    import torch

    compiler = compiled.get("compiler")
    layer_fn = _compiled("text_layer", _text_layer, compiler, rows={0: [0, 1], 1: [0, 1], 2: [0, 1], 3: [0, 2, 3]})
    layer_at_fn = _compiled("text_layer_at", _text_layer_at, compiler,
                            rows={0: [0, 1], 1: 0, 2: [0, 1], 3: [0, 1], 4: [0, 2, 3]})
    lm = inner.language_model
    state: dict[str, Any] = {"keep": None, "trimmed": False, "fast_calls": 0, "library_calls": 0}
    n_layers = len(lm.layers)

    def make(index: int, library_forward):
        last = index == n_layers - 1

        def forward(self, hidden_states, *args, **kwargs):
            cache = any(kwargs.get(n) is not None for n in ("past_key_value", "past_key_values", "cache"))
            pe = kwargs.get("position_embeddings")
            if (args or cache or kwargs.get("use_cache") or kwargs.get("output_attentions") or pe is None
                    or (torch.is_grad_enabled() and hidden_states.requires_grad)):
                state["library_calls"] += 1
                return library_forward(hidden_states, *args, **kwargs)
            cos, sin = pe  # [B, T, D]: the rotary embedding has merged M-RoPE's sections
            attn, mlp = self.self_attn, self.mlp
            mask = kwargs.get("attention_mask")
            weights = (self.input_layernorm.weight, float(self.input_layernorm.variance_epsilon),
                       *self._saec_qkv, attn.o_proj.weight,
                       self.post_attention_layernorm.weight, float(self.post_attention_layernorm.variance_epsilon),
                       self._saec_gate_up, mlp.down_proj.weight, self._saec_heads[0], self._saec_heads[1],
                       float(attn.scaling))
            keep = state["keep"] if last else None
            if keep is not None:
                out = layer_at_fn(hidden_states, keep, cos, sin, mask, *weights)
                state["trimmed"] = True
            else:
                out = layer_fn(hidden_states, cos, sin, mask, *weights)
            state["fast_calls"] += 1
            return out

        return forward

    for i, layer in enumerate(lm.layers):
        attn, mlp = layer.self_attn, layer.mlp
        layer._saec_qkv = _fused_rows(attn.q_proj, attn.k_proj, attn.v_proj)
        layer._saec_gate_up = _fused_rows(mlp.gate_proj, mlp.up_proj)[0]
        heads = attn.q_proj.out_features // attn.head_dim
        layer._saec_heads = (heads, attn.k_proj.out_features // attn.head_dim)
        library_forward = types.MethodType(type(layer).forward, layer)
        layer.forward = types.MethodType(make(i, library_forward), layer)
    return state


class _Kept:
    trimmed = False


@contextmanager
def keep_positions(model, positions):
    """While in effect, the fused last decoder layer (if installed) computes only `positions`
    ([B, K] indices): the model's last_hidden_state is then [B, K, H] and `.trimmed` is True."""
    base = _unwrap(model)
    record = getattr(base, "_saec_fast_path", None)
    state = (record or {}).get("language")
    kept = _Kept()
    if state is None:
        yield kept
        return
    state["keep"], state["trimmed"] = positions, False
    try:
        yield kept
    finally:
        kept.trimmed = state["trimmed"]
        state["keep"], state["trimmed"] = None, False


# --------------------------------------------------------------------------- entry point


def _model_type(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", type(model).__name__))


def _unwrap(model):
    """The transformers model underneath a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def install_fast_path(model, *, compile_vision: bool = False, compile_language: bool = False,
                      rope_broadcast: bool = True, compiler: Callable | None = None) -> dict:
    """Install the faster vision attention, patch embedding and position ids on a loaded model.

    Works on a Qwen2.5-VL model (plain, or under a PEFT wrapper, or with 4-bit language weights:
    only vision modules and the position-id builder are replaced; `compile_language` is then
    skipped with its reason). Returns a record of what was installed (and, for another family,
    why nothing was). Installing twice is an error. `compiler` replaces `torch.compile` (tests
    pass the identity to check the fused code itself on a CPU).
    """
    base = _unwrap(model)
    family = _model_type(base)
    options = {"compile_vision": compile_vision, "compile_language": compile_language, "rope_broadcast": rope_broadcast}
    record: dict[str, Any] = {"family": family, "installed": [], "skipped": {}, "stats": None, "options": options}
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

    compiled: dict[str, Any] = {"compiler": compiler}
    if compile_vision:
        mlp0 = visual.blocks[0].mlp
        act = getattr(getattr(visual, "config", None), "hidden_act", "silu")
        if act != "silu" or not all(hasattr(mlp0, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise FastPathError(f"compile_vision needs a SwiGLU (silu) vision MLP, found {type(mlp0).__name__} / {act}")
        if not hasattr(visual.blocks[0].norm1, "variance_epsilon"):
            raise FastPathError("compile_vision needs RMSNorm vision norms")
        rotary = compiled["rotary"] = _compiled("rotary", rotary, compiler, rows={0: 0, 1: 0, 2: 0, 3: 0})
        compiled["residual_mlp"] = _compiled("residual_mlp", _residual_mlp, compiler, rows={0: 0, 1: 0})
        compiled["rms_norm"] = _compiled("rms_norm", _rms_norm, compiler, rows={0: 0})

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

    stats = {"rope_index_broadcast": 0, "rope_index_per_row": 0, "vision_metadata_built": 0,
             "vision_metadata_reused": 0}
    reason = _vision_metadata_supported(visual)
    if reason is None:
        library_visual = types.MethodType(type(visual).forward, visual)
        visual.forward = types.MethodType(_make_visual_forward(library_visual, stats), visual)
        record["installed"].append("vision_metadata_per_grid")
    else:
        record["skipped"]["vision_metadata_per_grid"] = reason
    if rope_broadcast and hasattr(inner, "get_rope_index"):
        inner.get_rope_index = _make_rope_index(inner.get_rope_index, stats)
        record["installed"].append("rope_index_broadcast")
    elif rope_broadcast:
        record["skipped"]["rope_index_broadcast"] = "model has no get_rope_index"

    if compile_vision:
        block_forward = _make_block_forward(compiled["residual_mlp"], compiled["rms_norm"])
        for blk in visual.blocks:
            m = blk.mlp
            wgu, bgu = _fused_rows(m.gate_proj, m.up_proj, align=ALIGN)
            wd, bd = _padded_columns(m.down_proj, wgu.shape[0] // 2)
            blk._saec_mlp = (wgu, bgu, wd, bd)
            blk.forward = types.MethodType(block_forward, blk)
        record["installed"].append("vision_norm_rotary_mlp_compiled")
        record["vision_mlp_width"] = {"model": visual.blocks[0].mlp.gate_proj.out_features,
                                      "padded": visual.blocks[0]._saec_mlp[0].shape[0] // 2}

    if compile_language:
        reason = _language_unsupported(inner)
        if reason is None:
            state = _install_language(inner, compiled)
            record["installed"].append("language_layers_compiled")
            record["language"] = state
        else:
            record["skipped"]["language_layers_compiled"] = reason

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
    visual.__dict__.pop("forward", None)
    inner.__dict__.pop("get_rope_index", None)
    for blk in visual.blocks:
        blk.__dict__.pop("_saec_mlp", None)
    language = getattr(inner, "language_model", None)
    for layer in getattr(language, "layers", []):
        layer.__dict__.pop("forward", None)  # the fused weights stay: the modules' weights are views of them
    base._saec_fast_path = None
