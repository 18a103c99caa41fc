"""The embedded default cloud model: a small Qwen2.5-VL written as a complete Hugging Face folder.

`build_tiny_qwen` writes everything the real model folder has (config, generation config,
image-processor config, byte-level BPE tokenizer as vocab.json + merges.txt, chat template,
safetensors weights), so that the tiny model loads through exactly the code that loads
Qwen2.5-VL-7B-Instruct: `AutoProcessor.from_pretrained(folder)` and
`Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)`.

The tokenizer is trained offline with the `tokenizers` library on the project's own prompts
and answers, with Qwen's normaliser and pre-tokeniser (digits are split one by one, so the
label strings "0" and "1" are single tokens), plus the special tokens the Qwen processor and
template use. The chat template is the project's own, rendering the same structure as Qwen's.
Weights are random (seeded): the model learns everything it knows from the SFT data.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from saec.artifacts.store import atomic_dir
from saec.tasks.cloud.config import TinyModelConfig

# Qwen's special tokens, in Qwen's order; the processor and chat template need the vision ones.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

SYSTEM_PROMPT = "You are a helpful assistant."

# The project's chat template: a system turn first (unless one is given), then each turn as
# <|im_start|>role\n ... <|im_end|>\n, an image as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Qwen2's pre-tokeniser: contractions, words, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "saec_tiny.json"


def _corpus() -> list[str]:
    """The text the tokenizer learns from: every string the project puts in front of the model."""
    from saec.prompts import INSTRUCTION, answer
    from saec.tasks.cloud.explain import EXPLAIN_INSTRUCTION

    roles = ["system", "user", "assistant"]
    examples = [
        '{"bboxes": [[12, 40, 56, 80]], "desc": "a scratch on the surface"}',
        '{"bboxes": [[3, 7, 19, 28], [60, 61, 90, 99]], "desc": "two dents near the edge"}',
        '{"bboxes": [], "desc": "a stain with unclear borders"}',
    ]
    texts = [INSTRUCTION, EXPLAIN_INSTRUCTION, SYSTEM_PROMPT, answer(0), answer(1), *roles, *examples]
    return texts


def _train_tokenizer(cfg: TinyModelConfig, folder: Path) -> int:
    """Train a byte-level BPE on the project corpus; write vocab.json and merges.txt; return its size."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=cfg.vocab_target,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Repetition weights the frequent strings; the trainer is deterministic for a fixed input.
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    tok.model.save(str(folder))  # vocab.json, merges.txt
    vocab = json.loads((folder / "vocab.json").read_text())
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("trained BPE vocabulary ids are not contiguous")
    return len(vocab)


def _tokenizer_config(n_bpe: int) -> dict:
    added = {
        str(n_bpe + i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _model_config(cfg: TinyModelConfig, ids: dict[str, int], vocab_size: int) -> dict:
    """config.json in the layout of the published Qwen2.5-VL configs (flat language-model keys)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.init_std,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": 4096,
        "max_window_layers": cfg.num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": cfg.vision_depth,
            "hidden_act": "silu",
            "hidden_size": cfg.vision_hidden_size,
            "initializer_range": cfg.init_std,
            "intermediate_size": cfg.vision_intermediate_size,
            "num_heads": cfg.vision_num_heads,
            "in_chans": 3,
            "out_hidden_size": cfg.hidden_size,
            "patch_size": cfg.patch_size,
            "spatial_merge_size": cfg.spatial_merge_size,
            "spatial_patch_size": cfg.patch_size,
            "window_size": cfg.window_size,
            "fullatt_block_indexes": list(cfg.vision_fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": cfg.temporal_patch_size,
        },
        "rope_scaling": {"mrope_section": cfg.mrope_section, "rope_type": "mrope"},
        "vocab_size": vocab_size,
    }


def _preprocessor_config(cfg: TinyModelConfig) -> dict:
    unit = cfg.patch_size * cfg.spatial_merge_size
    return {
        "min_pixels": unit * unit * 4,
        "max_pixels": cfg.image_size * cfg.image_size,
        "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "merge_size": cfg.spatial_merge_size,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_qwen(out_dir: Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write the embedded default model to `out_dir` (replaced atomically) and return the folder.

    Deterministic for a given config: the same seed gives the same tokenizer and weights.
    """
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    cfg = cfg or TinyModelConfig()
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        n_bpe = _train_tokenizer(cfg, tmp)
        ids = {tok: n_bpe + i for i, tok in enumerate(SPECIAL_TOKENS)}
        n_tokens = n_bpe + len(SPECIAL_TOKENS)
        vocab_size = -(-n_tokens // 64) * 64  # padded like the published vocabularies
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(n_bpe))
        _write_json(tmp / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
        _write_json(tmp / "preprocessor_config.json", _preprocessor_config(cfg))
        _write_json(tmp / "config.json", _model_config(cfg, ids, vocab_size))
        _write_json(
            tmp / "generation_config.json",
            {
                "bos_token_id": ids["<|endoftext|>"],
                "pad_token_id": ids["<|endoftext|>"],
                "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                "do_sample": False,
            },
        )

        # Random weights, seeded, in the checkpoint layout the library writes for this class.
        config = AutoConfig.from_pretrained(tmp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
        weights_tmp = tmp / ".weights"
        model.save_pretrained(weights_tmp, safe_serialization=True)
        shutil.move(str(weights_tmp / WEIGHTS_FILE), tmp / WEIGHTS_FILE)
        shutil.rmtree(weights_tmp)

        n_params = sum(p.numel() for p in model.parameters())
        _write_json(
            tmp / RECIPE_FILE,
            {
                "recipe": cfg.model_dump(mode="json"),
                "parameters": n_params,
                "vocab_size": vocab_size,
                "bpe_tokens": n_bpe,
                "special_token_ids": ids,
                "visual_tokens_per_image": (cfg.image_size // (cfg.patch_size * cfg.spatial_merge_size)) ** 2,
            },
        )
    return out_dir
