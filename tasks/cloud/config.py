"""Typed configuration of the cloud branch: the embedded model, loading, training and scoring.

Defaults are the values the published SAEC scripts use (the paper's run; README, "The published
SAEC run"). Every config validates at construction, so a bad value fails before any model is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]
AttnImpl = Literal["sdpa", "eager", "flash_attention_2"]
Quantization = Literal["auto", "nf4", "none"]
Family = Literal["qwen2_5_vl", "llava"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("device", check_fields=False)
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)

    def cache_key_view(self) -> dict:
        """What a cache key holds: not the model and adapter paths (stages key those folders by
        content, as the ModelRef beside the config) nor whether a progress bar shows."""
        return self.model_dump(mode="json", exclude={"model", "adapter", "progress"})


def _check_device(value: str) -> str:
    if value == "auto" or value == "cpu" or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', not {value!r}")


# --------------------------------------------------------------------------- embedded model


class TinyModelConfig(_Strict):
    """A small Qwen2.5-VL built from config with random weights: the embedded default cloud model.

    It has the real architecture (windowed vision transformer, 2x2 patch merger, M-RoPE language
    model) at a size that trains on a laptop CPU in minutes. `image_size` is the side of the
    largest image the processor passes on (its `max_pixels` is image_size squared), so an image
    becomes at most (image_size / (patch_size * spatial_merge_size))^2 visual tokens. Patches are
    7 px, not Qwen's 14: a vision tower that learns from a few hundred images generalises better
    from finer patches (measured on 640 training images drawn at 4x visibility: 78.5 % holdout
    accuracy, against 74-77 % with 14-px patches). The first vision block attends within 56-px
    windows, the last over the whole image, as Qwen's tower does at its scale. Weights are drawn
    with std 1/sqrt(hidden) unless `initializer_range` says otherwise: the published 0.02 suits a
    3584-wide model, and at width 128 it leaves the output logits so small that training first
    spends epochs scaling them.
    """

    seed: int = 0
    image_size: int = 112
    vocab_target: int = Field(512, description="BPE vocabulary size before the special tokens")
    # language model
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # vision tower
    vision_depth: int = 2
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_num_heads: int = 4
    vision_fullatt_block_indexes: tuple[int, ...] = (1,)
    window_size: int = 56
    patch_size: int = 7
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    initializer_range: float | None = Field(
        None, gt=0, description="std of the random weights; None = 1/sqrt(hidden_size), the scale a narrow model needs"
    )

    @model_validator(mode="after")
    def _shapes(self) -> "TinyModelConfig":
        unit = self.patch_size * self.spatial_merge_size
        if self.image_size % unit or self.image_size < unit:
            raise ValueError(f"image_size must be a positive multiple of patch_size*spatial_merge_size={unit}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 2 or head_dim // 2 < 3:
            raise ValueError("the language model's head dimension must be even and at least 6 (M-RoPE sections)")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            raise ValueError("vision head dimension must be a multiple of 4 (2-D rotary embedding)")
        if any(i < 0 or i >= self.vision_depth for i in self.vision_fullatt_block_indexes):
            raise ValueError("vision_fullatt_block_indexes must index blocks of the vision tower")
        if self.window_size % unit:
            raise ValueError(f"window_size must be a multiple of {unit}")
        if self.vocab_target < 300:
            raise ValueError("vocab_target must be at least 300 (256 byte symbols plus merges)")
        return self

    @property
    def init_std(self) -> float:
        return self.initializer_range if self.initializer_range is not None else round(self.hidden_size**-0.5, 4)

    @property
    def mrope_section(self) -> list[int]:
        """Split of the rotary half-dimension into temporal, height and width parts (Qwen's 1:1.5:1.5)."""
        half = self.hidden_size // self.num_attention_heads // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


# --------------------------------------------------------------------------- loading


class ModelLoadConfig(_Strict):
    """Where a vision-language model comes from and how it is placed.

    `model` is a local Hugging Face folder or a hub id (resolved from the local cache only
    when HF_HUB_OFFLINE is set). `quantization="auto"` means NF4 on CUDA and none on CPU.
    """

    model: str
    adapter: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    attn_implementation: AttnImpl = "sdpa"
    quantization: Quantization = "none"


# --------------------------------------------------------------------------- training


class CloudTrainConfig(_Strict):
    """QLoRA supervised fine-tuning of the cloud model on the SFT JSONL.

    Defaults reproduce the SAEC scripts: 3 epochs, batch 2 x 8 accumulation, lr 2e-4, cosine
    schedule with 3 % warm-up, gradient checkpointing, LoRA r=8 alpha=16 dropout 0.05 without
    bias on the language model's attention projections, vision merger trainable and kept out of
    4-bit quantization, NF4 + double quantization + bf16 compute on CUDA. The SAEC scripts also put
    LoRA on the language model's MLP (gate/up/down); `lora_mlp=True` reproduces that.

    `trainable` chooses what learns:
      - "lora": the LoRA adapters only;
      - "lora+merger": LoRA plus the vision merger, saved with the adapter (the SAEC recipe);
      - "lora+vision": LoRA plus the whole vision tower, saved with the adapter;
      - "full": every weight (no adapter; the whole model is written out). Incompatible with NF4.
    `train_output_layer=True` adds the output layer and the final norm to what the adapter saves.

    `augment` transforms each training image by an operation drawn from (seed, epoch, example),
    so a resumed run sees exactly the images an uninterrupted one would: "flip" mirrors left-right
    or not; "dihedral" applies one of the eight flips and quarter turns. Use it only for categories
    whose labels do not depend on orientation, and list them in `augment_categories`: a capsule
    turned half-way round is MVTec's "misplaced" defect, a mesh or a washer turned is still good.
    `augment_shift` moves images by up to that many pixels each way (the uncovered border mirrored)
    and `augment_lighting` scales brightness and contrast by up to that fraction; both draw from
    their own streams of (seed, epoch) and, like the turns, apply to `augment_categories` only. A
    part shifted off its fixture position is also "misplaced", and a shade can be a defect, so list
    the categories where neither is. On a second synthetic draw (three seeds each) shifts did not
    raise the tiny model's holdout accuracy beyond the spread between seeds (they end the false
    alarms on good grids but miss more bent wires and ring defects), so the tiny recipe leaves
    them off. Lighting of 0.15 with 32 epochs raised the mean at threshold 0.5 from 85.3 % (24
    epochs, none) and 87.2 % (32 epochs, none) to 87.8 %; 0.25 gave 84.6 %, and 40 epochs 87.5 %
    (`benchmarks/results/cloud_recipes_combine.json`), so the tiny recipe uses 0.15. Twice the
    training images did more than any recipe change: on a draw at twice those counts, the same
    recipe on 1,257 of its 1,280 training images (at most 40 per defect type) gave, at 0.5 without
    test-time turns, 89.0 % for the same number of optimizer steps (16 epochs) and 90.0 % for 1.25
    times as many (20 epochs), against 85.0 % on 640 of them (`cloud_recipes_data2.json`, three to six seeds each); the
    embedded data now holds 1,280 and the tiny recipe runs 20 epochs.

    `explain_turn=True` teaches explanations along with verdicts: every defect example whose SFT
    record holds an `explain` target (written from its ground-truth mask) gets a follow-up turn
    that asks for the explanation, answered by the JSON of the target's boxes on the image as
    shown (resized, turned, shifted) and the defect type in words; both answers carry the loss.
    The scoring engine asks for explanations in that same conversation. On the tiny model the
    second task costs accuracy (three seeds: 79.1 % against 85.3 % at 0.5,
    `benchmarks/results/cloud_recipes_explain.json`), so the tiny recipe leaves it off.

    `ema_decay` saves an exponential moving average of the trained weights instead of the last
    step's; the checkpoints hold both, so a resumed run goes on averaging. With the cosine schedule
    running down to zero it moved the tiny model's holdout accuracy by no more than half a point
    (three seeds each, `benchmarks/results/cloud_recipes_average.json`), so no recipe sets it.

    `quantization="auto"` is NF4 on CUDA and none on CPU (4-bit weights cannot be trained, and
    a CPU is where the embedded default model trains). `dtype="auto"` is bf16 on CUDA, float32 on CPU.

    For the embedded default (the shipped tiny Qwen2.5-VL stand-in, pretrained on a world whose
    categories the evaluation never shows; saec.standins) use `CloudTrainConfig.tiny(...)`: the
    SAEC recipe's shape at that model's size, LoRA r=16 on the language model's attention and
    MLP at lr 3e-4 with batch 8, float32 on the CPU without gradient checkpointing (nothing to
    save in memory at that size), 8 epochs at 140 px (the stand-in was pretrained at 112; 10
    epochs at 112 gave 87.7 % on the embedded holdout, 8 at 140 gave 88.6 %, 12 at 140 88.4 %).
    Two things stay from the recipe that trained the model from random weights, because the
    measurements still ask for them (docs/pretrained-standins.md): the vision tower trains with
    the adapter, not only the merger (LoRA and the merger alone on the stand-in's tower, which
    saw tiles, leather and pills, reach 85.6 %); and the images of the categories without
    orientation (carpet, grid, ring) are turned, flipped and varied in brightness and contrast by
    up to 15 %, since a tower fine-tuned on about a thousand images still overfits them. The
    output layer no longer trains, and 20 epochs became 8. The adapter interface stays the real
    model's: base folder + PEFT adapter.
    """

    model: str
    # optimisation
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(8, ge=1)
    micro_batch: int | Literal["auto"] = Field(
        "auto", description="images per forward and backward pass; the optimizer still steps once per "
                            "batch_size x grad_accum images, so the recipe is the same whatever it is (with "
                            "label answers; see `passes`). "
                            "'auto' = the whole batch in one pass on CUDA (16 images of 512 px took 11.2 GB with "
                            "the 7B model in NF4), batch_size on a CPU; a GPU short of memory takes a "
                            "smaller divisor of the batch")
    lr: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the trained weights and save it "
                                      "instead of the last step's; None = save the last step's weights")
    seed: int = 42
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (smoke runs)")
    # what learns
    trainable: Literal["lora", "lora+merger", "lora+vision", "full"] = "lora+merger"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_mlp: bool = False
    train_output_layer: bool = Field(
        False, description="also train lm_head and the final norm (saved with the adapter); for random-init models"
    )
    explain_turn: bool = Field(
        False, description="after the label answer of each defect example with an explanation target, ask for the "
                           "explanation and train on its answer too (boxes on the image shown, and the defect type)")
    # numerics and placement
    quantization: Quantization = "auto"
    dtype: DType = "auto"
    device: str = "auto"
    attn_implementation: AttnImpl = "sdpa"
    gradient_checkpointing: bool = True
    # data
    resize: int | None = Field(512, ge=28, description="square side images are resized to before the processor")
    balance: Literal["oversample", "none"] = Field(
        "oversample", description="'oversample': repeat the smaller class's examples (the repeats drawn "
                                  "once, seeded, each with its own augmentation every epoch) until both "
                                  "classes are as many in every epoch; 'none': train on the classes as they come")
    augment: Literal["none", "flip", "dihedral"] = Field(
        "none", description="label-preserving geometric augmentation of training images (see the class notes)"
    )
    augment_categories: tuple[str, ...] | None = Field(
        None, description="categories every augmentation applies to; None = all (see the class notes)"
    )
    augment_shift: int = Field(
        0, ge=0, description="largest translation in pixels of the resized image (border mirrored); 0 = none")
    augment_lighting: float = Field(
        0.0, ge=0, lt=1, description="largest relative change of brightness and of contrast; 0 = none")
    preprocess_workers: int = Field(2, ge=1, description="threads preparing batches ahead of a GPU (a CPU prepares inline)")
    # checkpoints and logging
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "CloudTrainConfig":
        if self.trainable == "full" and self.quantization == "nf4":
            raise ValueError("trainable='full' cannot train 4-bit weights: use quantization='none'")
        if self.micro_batch != "auto":
            if self.micro_batch < 1 or (self.batch_size * self.grad_accum) % self.micro_batch:
                raise ValueError(f"micro_batch={self.micro_batch} must divide the optimizer's batch, batch_size x "
                                 f"grad_accum = {self.batch_size * self.grad_accum}")
        return self

    def passes(self, device_type: str) -> tuple[int, int]:
        """(images per pass, passes per optimizer step) on a device of this type.

        Every optimizer step sees batch_size x grad_accum images, and the loss is the mean of the
        passes' means, so a step's gradient does not depend on how the batch is split where every
        example carries as many answer tokens as any other, which holds for the label answers. With
        `explain_turn` the examples' answers differ in length and the split weighs them a little
        differently; so does the last, shorter step of an epoch. Larger passes keep a GPU busy: the
        recipe's 2 images per pass left an H200 at a quarter of its training rate
        (benchmarks/results/real_size_qlora_h200.json).
        """
        total = self.batch_size * self.grad_accum
        if self.micro_batch == "auto":
            size = total if device_type == "cuda" else self.batch_size
        else:
            size = self.micro_batch
        return size, total // size

    @classmethod
    def tiny(cls, model: str | Path, **overrides) -> "CloudTrainConfig":
        """The recipe that fine-tunes the embedded stand-in on a small CPU in minutes."""
        values = dict(
            model=str(model),
            epochs=8,
            batch_size=8,
            grad_accum=1,
            lr=3e-4,
            warmup_ratio=0.05,
            weight_decay=0.01,
            trainable="lora+vision",
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            lora_mlp=True,
            train_output_layer=False,
            quantization="none",
            dtype="float32",
            device="cpu",
            gradient_checkpointing=False,
            resize=140,
            augment="dihedral",
            augment_categories=("carpet", "grid", "ring"),
            augment_lighting=0.15,
            checkpoint_every=25,
        )
        values.update(overrides)
        return cls(**values)


# --------------------------------------------------------------------------- scoring


class CloudScoreConfig(_Strict):
    """Scoring with the cloud model: P(defect) from the next-token logits of "0" and "1".

    Defaults are the SAEC run's: images resized to 512 x 512 (448 for the zero-shot baselines),
    batches of 24, defect iff P(defect) >= 0.26 (`threshold`: the verdicts `score()` returns and the
    images that get explanations; a scores table keeps P(defect) only, and a pipeline sets the
    threshold to `routing.cloud_thr`, the one its decisions use). `impl="reference"` is the plain Hugging Face
    forward (full-vocabulary logits everywhere); `impl="fast"` computes only the two label rows
    of the output layer at the last position of each row, and merges LoRA into the base weights
    when they are not quantized.

    On CUDA the fast implementation also installs `saec.tasks.cloud.fast` (batched vision windows,
    and with `compile_vision` / `compile_language` the compiled vision blocks and decoder layers).

    `tta="five_crop"` scores the four corners and the centre (each `resize` square, taken from the
    image after its shorter side is brought up to `resize` when smaller) and compares the mean
    summed log-probabilities of the full answers `Label: 0` and `Label: 1`. `tta="dihedral"`
    scores the image under its eight flips and quarter turns and averages the two label logits
    over them: for products whose labels do not depend on orientation (a mesh, a washer, a
    woven surface), and for a model trained with the same turns (`CloudTrainConfig.augment`).
    With `tta_categories` set, a manifest's rows get the augmentation only where their
    `category` is listed, the others are scored once.
    `explain=True` generates a JSON explanation for every defect verdict.
    """

    model: str
    adapter: str | None = None
    family: Family | None = Field(None, description="checked against the model's config when given")
    resize: int | None = Field(512, ge=28)
    batch_size: int = Field(24, ge=1)
    threshold: float = Field(0.26, ge=0, le=1)
    dtype: DType = "auto"
    device: str = "auto"
    attn_implementation: AttnImpl = "sdpa"
    quantization: Quantization = "none"
    impl: Literal["reference", "fast"] = "fast"
    compile_vision: bool = Field(
        True, description="fast path on CUDA: fuse each vision block's norms, rotary embedding and MLP with "
                          "torch.compile (compiled once per process: with compile_language about a minute on "
                          "the H200, first batches included)")
    compile_language: bool = Field(
        True, description="fast path on CUDA: one torch.compile'd decoder layer (fused q/k/v and gate/up "
                          "products, fused norms, rotary and SiLU) for every language layer, the last layer "
                          "computed at the scored position only; layers that are quantized or carry an "
                          "unmerged adapter keep the library's forward")
    prepare_on_device: bool = Field(
        True, description="fast implementation, Qwen2.5-VL, `resize` set (every image the same size): token "
                          "ids built once per image size, pixels sent as uint8 and normalised and cut into "
                          "patches on the device exactly as the processor does; otherwise the processor "
                          "prepares every batch")
    tta: Literal["none", "five_crop", "dihedral"] = "none"
    tta_categories: tuple[str, ...] | None = Field(
        None, description="categories whose rows get the test-time augmentation (scoring a manifest); None = all")
    explain: bool = False
    explain_max_new_tokens: int = Field(192, ge=1)
    explain_batch_size: int = Field(8, ge=1)
    decode_workers: int = Field(4, ge=1)
    prefetch_batches: int = Field(2, ge=1)
    devices: tuple[str, ...] | Literal["all"] | None = Field(
        None, description="score on these devices at once, one process each, the images cut into contiguous "
                          "shards and the results merged in order ('all' = every visible GPU); None = `device` "
                          "alone in this process")
    progress: bool = True

    @field_validator("devices")
    @classmethod
    def _devices(cls, value):
        if isinstance(value, tuple):
            if not value:
                raise ValueError("devices is empty: list one or more devices, 'all', or leave it unset")
            return tuple(_check_device(v) for v in value)
        return value

    def cache_key_view(self) -> dict:
        """As `_Strict.cache_key_view`, and not `threshold` unless explanations are asked for: the scores
        table keeps probabilities only, and the threshold decides nothing else in it. `devices` stays:
        the scores are the same (shards are cut at batch boundaries), but the stage's measured time
        and telemetry are those of the devices it ran on."""
        view = super().cache_key_view()
        if not self.explain:
            del view["threshold"]
        return view

    def load_config(self) -> ModelLoadConfig:
        return ModelLoadConfig(
            model=self.model,
            adapter=self.adapter,
            dtype=self.dtype,
            device=self.device,
            attn_implementation=self.attn_implementation,
            quantization=self.quantization,
        )
