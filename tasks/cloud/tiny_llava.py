"""The embedded default LLaVA-1.5: a small LLaVA written as a complete Hugging Face folder.

`build_tiny_llava` writes the files the published `llava-hf/llava-1.5-7b-hf` folder has (config,
generation config, CLIP image-processor config, processor config, fast tokenizer, special-token
maps, chat template, model card) plus safetensors weights, so that the tiny model loads through
exactly the code that loads LLaVA-1.5-7B: `AutoProcessor.from_pretrained(folder)` and
`LlavaForConditionalGeneration.from_pretrained(folder)`. It stands in for the LLaVA-1.5-7B
zero-shot baseline wherever the real weights are absent.

Architecture: a CLIP vision transformer (class token + patches, features taken from the
second-to-last layer, class token dropped: the "default" strategy), a two-layer GELU projector,
and a Llama decoder; one `<image>` placeholder in the prompt becomes (image_size / patch_size)^2
image tokens in the processor, one per patch the vision tower emits.

The tokenizer is trained offline with the `tokenizers` library on the project's prompts and
answers and the chat template's role words, in the layout of the LLaMA tokenizer: ids 0-2 are
<unk>, <s>, </s>; ids 3-258 are the byte-fallback tokens <0x00>..<0xFF> (any text encodes);
then the learned pieces, with "▁" marking a preceding space; digits are never merged, so the
labels "0" and "1" after "Label: " are single tokens as in the real tokenizer; `<image>` and
`<pad>` follow the base vocabulary (the real folder's 32000 and 32001), and the embedding matrix
is padded to a multiple of 64 (the real 32064). Weights are random (seeded).
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from saec.artifacts.store import atomic_dir

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
SPACE = "\u2581"  # "▁", SentencePiece's mark of a preceding space

# The project's chat template, rendering the structure of LLaVA-1.5's: each non-system turn as
# "ROLE: ", its images first as "<image>\n", then its texts each followed by a space; the
# generation prompt is "ASSISTANT:". Assistant text is marked for assistant-token masks.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}"
    "{{- message['role'].upper() + ': ' -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + ' ' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + ' ' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}"
    "{{- '<image>\\n' -}}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- part['text'] + ' ' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- part['text'] + ' ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- 'ASSISTANT:' -}}"
    "{%- endif -%}"
)

# Pre-tokenisation used while learning merges (on text already normalised: spaces are "▁" and a
# "▁" is prepended): a word is an optional "▁" plus a run of letters, or an optional "▁" plus a
# run of other symbols; digits stand alone and "▁" before a digit stands alone. No merge then
# crosses those boundaries, so the folder's tokenizer, which like LLaMA's has a normaliser and
# no pre-tokeniser, segments text exactly as the pieces were learned.
TRAIN_SPLIT_REGEX = SPACE + r"?\p{L}+|" + SPACE + r"?[^" + SPACE + r"\p{L}\p{N}]+|\p{N}|" + SPACE

# Explanation outputs the model may be asked for (see saec.tasks.cloud.explain).
_EXPLANATION_EXAMPLES = [
    '{"bboxes": [[12, 40, 56, 80]], "desc": "a scratch on the surface"}',
    '{"bboxes": [[3, 7, 19, 28], [60, 61, 90, 99]], "desc": "two dents near the edge"}',
    '{"bboxes": [], "desc": "a stain with unclear borders"}',
]

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "saec_tiny.json"
N_BASE_SPECIAL = 3 + len(BYTE_TOKENS)  # <unk>, <s>, </s> and the byte-fallback tokens
ALPHABET = [c for c in string.printable if not c.isspace()] + [SPACE]


class TinyLlavaConfig(BaseModel):
    """A small LLaVA-1.5 built from config with random weights: the embedded LLaVA baseline.

    The layout is LLaVA-1.5-7B's at a size that runs on a CPU in seconds: a CLIP vision tower
    of `vision_num_hidden_layers` blocks over `image_size` squares cut in `patch_size` patches,
    a GELU projector and a Llama decoder. The processor resizes the shortest side to
    `image_size` and centre-crops, so every image becomes (image_size / patch_size)^2 tokens.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    vocab_target: int = Field(
        640,
        description="base vocabulary size the tokenizer trainer aims at (3 specials, 256 bytes, alphabet, merges); "
        "the default exceeds what the corpus supports, so every corpus word is learned whole",
    )
    max_position_embeddings: int = Field(4096, ge=256)
    # vision tower (CLIP)
    image_size: int = Field(112, ge=14)
    patch_size: int = Field(14, ge=1)
    vision_hidden_size: int = Field(64, ge=8)
    vision_intermediate_size: int = Field(256, ge=8)
    vision_num_hidden_layers: int = Field(2, ge=1)
    vision_num_attention_heads: int = Field(4, ge=1)
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    # projector
    projector_hidden_act: str = "gelu"
    # language model (Llama)
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _shapes(self) -> "TinyLlavaConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.vision_hidden_size % self.vision_num_attention_heads:
            raise ValueError("vision_hidden_size must be divisible by vision_num_attention_heads")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the language model's head dimension must be even (rotary embedding)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        n = self.vision_num_hidden_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} does not index the {n + 1} hidden states "
                f"of a {n}-layer vision tower (embeddings plus one per layer)"
            )
        minimum = N_BASE_SPECIAL + len(ALPHABET) + 32
        if self.vocab_target < minimum:
            raise ValueError(
                f"vocab_target must be at least {minimum}: {N_BASE_SPECIAL} special and byte tokens, "
                f"{len(ALPHABET)} alphabet symbols and some merges"
            )
        return self

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens_per_image(self) -> int:
        """Image tokens one `<image>` expands to: the patches, plus the class token under "full"."""
        return self.patches_per_image + (1 if self.vision_feature_select_strategy == "full" else 0)


# --------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """The text the tokenizer learns from: what the project puts in front of the model, as rendered."""
    from saec.prompts import INSTRUCTION, answer
    from saec.tasks.cloud.explain import EXPLAIN_INSTRUCTION

    # The user turn around the image placeholder. The newline after "<image>" is left out, so it
    # encodes as the byte token <0x0A>, as in the LLaMA tokenizer.
    texts = []
    for instruction in (INSTRUCTION, EXPLAIN_INSTRUCTION):
        texts += ["USER: ", instruction + " ASSISTANT:"]
    texts += [f"ASSISTANT: {answer(label)} " for label in (0, 1)]
    texts += [f"ASSISTANT: {example} " for example in _EXPLANATION_EXAMPLES]
    texts += ["USER", "ASSISTANT", "SYSTEM"]
    return texts


def _normalizer():
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])


def _learn_pieces(cfg: TinyLlavaConfig) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocabulary (ids 0..n-1, specials and bytes first) and merges learned from the corpus."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(TRAIN_SPLIT_REGEX), behavior="isolated", invert=False)
    trainer = BpeTrainer(
        vocab_size=cfg.vocab_target,
        min_frequency=1,
        show_progress=False,
        special_tokens=[UNK, BOS, EOS, *BYTE_TOKENS],
        initial_alphabet=ALPHABET,
    )
    # Repetition weights the frequent strings; the trainer is deterministic for a fixed input.
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("trained BPE vocabulary ids are not contiguous")
    expected = {t: i for i, t in enumerate([UNK, BOS, EOS, *BYTE_TOKENS])}
    if any(vocab.get(t) != i for t, i in expected.items()):
        raise RuntimeError("trained BPE vocabulary does not start with <unk>, <s>, </s> and the 256 byte tokens")
    return vocab, merges


def _build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The fast tokenizer in LLaMA's layout: normaliser, no pre-tokeniser, byte fallback, <s> prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )

    def special(content: str) -> AddedToken:
        return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)

    tok.add_special_tokens([special(UNK), special(BOS), special(EOS), special(IMAGE), special(PAD)])
    return tok


def _added_token_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_config(ids: dict[str, int], cfg: TinyLlavaConfig) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": {str(ids[t]): _added_token_entry(t) for t in (UNK, BOS, EOS, IMAGE, PAD)},
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "extra_special_tokens": {"image_token": IMAGE},
        "image_token": IMAGE,
        "legacy": False,
        "model_max_length": cfg.max_position_embeddings,
        "pad_token": PAD,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }


def _special_tokens_map() -> dict:
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "bos_token": {"content": BOS, **entry},
        "eos_token": {"content": EOS, **entry},
        "pad_token": {"content": PAD, **entry},
        "unk_token": {"content": UNK, **entry},
    }


# --------------------------------------------------------------------------- configs


def _model_config(cfg: TinyLlavaConfig, ids: dict[str, int], n_base: int, vocab_size: int) -> dict:
    """config.json in the layout of the published llava-1.5 configs, with every size written out."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": ids[IMAGE],
        "image_seq_length": cfg.image_tokens_per_image,
        "model_type": "llava",
        "pad_token_id": ids[PAD],
        "projector_hidden_act": cfg.projector_hidden_act,
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS],
            "hidden_act": "silu",
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "model_type": "llama",
            "num_attention_heads": cfg.num_attention_heads,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_key_value_heads": cfg.num_key_value_heads,
            "pad_token_id": ids[PAD],
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "vocab_size": vocab_size,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vision_config": {
            "hidden_act": "quick_gelu",
            "hidden_size": cfg.vision_hidden_size,
            "image_size": cfg.image_size,
            "intermediate_size": cfg.vision_intermediate_size,
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": cfg.vision_num_attention_heads,
            "num_channels": 3,
            "num_hidden_layers": cfg.vision_num_hidden_layers,
            "patch_size": cfg.patch_size,
            "projection_dim": cfg.vision_hidden_size,
            "vocab_size": n_base,
        },
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "vocab_size": vocab_size,
    }


def _preprocessor_config(cfg: TinyLlavaConfig) -> dict:
    return {
        "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": cfg.image_size},
    }


def _processor_config(cfg: TinyLlavaConfig) -> dict:
    return {
        "image_token": IMAGE,
        "num_additional_image_tokens": 1,  # the CLIP class token
        "patch_size": cfg.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
    }


def _model_card(cfg: TinyLlavaConfig, n_params: int, vocab_size: int) -> str:
    return (
        "# SAEC tiny LLaVA-1.5\n\n"
        "A small `LlavaForConditionalGeneration` with random (seeded) weights, written by "
        "`saec.tasks.cloud.tiny_llava.build_tiny_llava`. It has the files and layout of "
        "`llava-hf/llava-1.5-7b-hf` and loads with `AutoProcessor` and "
        "`LlavaForConditionalGeneration.from_pretrained`; it is the embedded default for the "
        "LLaVA-1.5 zero-shot baseline. Its outputs carry no knowledge.\n\n"
        f"- vision tower: CLIP, {cfg.vision_num_hidden_layers} layers, hidden {cfg.vision_hidden_size}, "
        f"image {cfg.image_size}, patch {cfg.patch_size} ({cfg.image_tokens_per_image} image tokens per image)\n"
        f"- language model: Llama, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocabulary {vocab_size}\n"
        f"- parameters: {n_params}\n"
        f"- seed: {cfg.seed}\n\n"
        "Prompt: `USER: <image>\\n<instruction> ASSISTANT:`\n"
    )


# Loaded parameter names -> names in the published llava-1.5 checkpoints. The CLIP tower is stored
# under `vision_tower.vision_model.` there, whether or not the library's class keeps that level.
_CHECKPOINT_NAMES = [
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.vision_tower\.(vision_model\.)?"), "vision_tower.vision_model."),
]


def checkpoint_state_dict(model) -> dict:
    """The model's tensors keyed by the parameter names of the published LLaVA-1.5 checkpoints.

    Every loader of `llava-hf/llava-1.5-*-hf` reads these names, so the written file does not
    depend on how the installed library names modules in memory.
    """
    out = {}
    for name, tensor in model.state_dict().items():
        for pattern, repl in _CHECKPOINT_NAMES:
            new, n = pattern.subn(repl, name)
            if n:
                break
        else:
            raise RuntimeError(f"parameter {name!r} has no published checkpoint name")
        if new in out:
            raise RuntimeError(f"two parameters map to the checkpoint name {new!r}")
        out[new] = tensor.detach().to("cpu").contiguous().clone()
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- build


def build_tiny_llava(out_dir: Path, cfg: TinyLlavaConfig | None = None) -> Path:
    """Write the embedded LLaVA-1.5 to `out_dir` (replaced atomically) and return the folder.

    Deterministic for a given config: the same seed gives byte-identical files.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlavaForConditionalGeneration

    cfg = cfg or TinyLlavaConfig()
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        vocab, merges = _learn_pieces(cfg)
        tokenizer = _build_tokenizer(vocab, merges)
        n_base = len(vocab)
        ids = {t: tokenizer.token_to_id(t) for t in (UNK, BOS, EOS, IMAGE, PAD)}
        if ids[IMAGE] != n_base or ids[PAD] != n_base + 1:
            raise RuntimeError(f"added tokens got ids {ids}; expected <image>={n_base}, <pad>={n_base + 1}")
        vocab_size = -(-(n_base + 2) // 64) * 64  # padded like the published embedding matrix
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(ids, cfg))
        _write_json(tmp / "special_tokens_map.json", _special_tokens_map())
        _write_json(tmp / "added_tokens.json", {IMAGE: ids[IMAGE], PAD: ids[PAD]})
        _write_json(tmp / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
        _write_json(tmp / "preprocessor_config.json", _preprocessor_config(cfg))
        _write_json(tmp / "processor_config.json", _processor_config(cfg))
        _write_json(tmp / "config.json", _model_config(cfg, ids, n_base, vocab_size))
        _write_json(
            tmp / "generation_config.json",
            {"_from_model_config": True, "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]},
        )

        # Random weights, seeded, under the published checkpoint's parameter names.
        config = AutoConfig.from_pretrained(tmp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
        save_file(checkpoint_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

        n_params = sum(p.numel() for p in model.parameters())
        (tmp / "README.md").write_text(_model_card(cfg, n_params, vocab_size), encoding="utf-8")
        _write_json(
            tmp / RECIPE_FILE,
            {
                "recipe": cfg.model_dump(mode="json"),
                "family": "llava",
                "parameters": n_params,
                "vocab_size": vocab_size,
                "bpe_tokens": n_base,
                "merges": len(merges),
                "special_token_ids": ids,
                "visual_tokens_per_image": cfg.image_tokens_per_image,
            },
        )
    return out_dir
