"""Recipe configuration of quantization (QAT, or PTQ calibration): 8-bit by default, with int4 weights, int4 / 2-bit
word-embedding rows, group-wise RTN, SignRound and FP8 emulation as options (docs/lowbit.md). Imports no torch.

    - kind: quantization
      mode: qat                  # or ptq: calibrate on calibration_batches training batches, no training
      start_step: 1200           # or start_epoch; QAT switches on here (after pruning has ended)
      observer: minmax           # or lsq (learnable scales after the warm-up)
      observer_momentum: 0.9     # running = momentum * running + (1 - momentum) * batch
      freeze_after_steps: 200    # observer warm-up, in optimizer steps from the start; then frozen
      activations: {linear_inputs: true, residual_sums: false, layernorm_outputs: false}
      peg: {groups: 6, permute: true}   # per-embedding-group ranges for the outlier-prone activations
      keep_16bit: ['output\\.LayerNorm\\.input$']
      embeddings: true           # word embeddings int8 per row in training too, as the export stores them

Number formats (what :meth:`Quantizer.convert` hands to the export):

- weights: int8, symmetric, per output channel, codes in [-127, 127], ``w = code * scale[out]``; a pruned
  (masked) weight is exactly code 0;
- activations: 8 bits per tensor (or per group with PEG) as **uint8 codes in [0, 255]** with a zero point,
  ``x = (code - zero_point) * scale``; ``activation_scheme: symmetric`` fixes the zero point at 128 (signed
  int8 shifted into uint8), ``asymmetric`` (default) takes it from the observed range, which always includes 0.
  uint8 activations x int8 weights is the operand convention of x86 ``vpmaddubsw`` / VNNI and onnxruntime.

Activation points are named ``<module>.input`` (a Linear's or a LayerNorm's input) and ``<module>.output``
(a LayerNorm's output); ``peg.targets`` and ``keep_16bit`` are regular expressions searched in those names.
Residual sums are the inputs of the encoder's LayerNorms (BERT: ``attention.output.LayerNorm``,
``output.LayerNorm``; DistilBERT: ``sa_layer_norm``, ``output_layer_norm``).

QAT and pruning in one recipe: QAT must not start before the pruning window ends (masks still moving under
frozen quantization ranges waste the warm-up): ``check_recipe`` refuses it with an error on ``start_step`` /
``start_epoch``. Give both windows in the same unit (steps or epochs) so the order can be checked.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparsify.config import Config, FieldError, check_start_within_training, epochs_to_steps
from sparsify.layers import DEFAULT_INCLUDE, check_patterns

# The activations where BERT-style encoders carry their structured outliers (Bondarenko et al. 2021): the
# feed-forward input (the LayerNorm output after attention) and the residual sum after the feed-forward.
DEFAULT_PEG_TARGETS: tuple[str, ...] = (
    r"(?:intermediate\.dense|ffn\.lin1)\.input$",
    r"(?:(?<!attention\.)output\.LayerNorm|output_layer_norm)\.input$",
)

DEFAULT_CALIBRATION_BATCHES = 32


def _listify(v):
    return (v,) if isinstance(v, str) else v


class ActivationsConfig(Config):
    """Which activations are fake-quantized to 8 bits (per tensor, or per group with PEG)."""

    linear_inputs: bool = Field(True, description="The input of every quantized Linear layer.")
    residual_sums: bool = Field(False, description="The residual sums: inputs of the encoder's LayerNorms.")
    layernorm_outputs: bool = Field(False, description="The outputs of the encoder's LayerNorms.")


class PegConfig(Config):
    """Per-embedding-group activation quantization (Bondarenko et al. 2021): the last (hidden) dimension is
    split into ``groups`` groups, each with its own range; with ``permute`` the dimensions are first sorted by
    their observed range so that the outlier dimensions share groups."""

    groups: int = Field(description="Groups per activation; must divide the width of every targeted activation.")
    permute: bool = Field(True, description="Sort dimensions by range before grouping (fixed when observers freeze).")
    targets: tuple[str, ...] = Field(
        DEFAULT_PEG_TARGETS, min_length=1,
        description="Regexes searched in activation point names (<module>.input / <module>.output); default: the "
        "feed-forward input and the residual sum after the feed-forward.",
    )

    @field_validator("groups")
    @classmethod
    def _groups(cls, v):
        if v < 1:
            raise ValueError(f"groups must be at least 1, got {v}")
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _list(cls, v):
        return _listify(v)

    @model_validator(mode="after")
    def _check(self):
        check_patterns(self.targets, "targets")
        return self


class QuantizationConfig(Config):
    """8-bit quantization that keeps sparsity: fake-quantized int8 weights (symmetric, per output channel, pruning
    masks inside) and uint8 activations (per tensor, or per embedding group), trained (QAT) or calibrated (PTQ)."""

    kind: Literal["quantization"] = "quantization"
    mode: Literal["qat", "ptq"] = Field(
        "qat", description="qat: fake quantization during training from start_step; ptq: calibrate the observers on "
        "calibration_batches training batches, no training."
    )
    bits: Literal[8] = Field(8, description="Bit width of the integer activations (uint8); only 8. The weights' "
                             "bits: weight_bits; the word rows': embedding_bits.")
    start_step: int | None = Field(None, ge=0, description="QAT: optimizer step at which fake quantization switches on "
                                   "(default 0); not before the end of a pruning window in the same recipe.")
    start_epoch: float | None = Field(None, ge=0, description="Instead of start_step; converted to optimizer steps.")
    observer: Literal["minmax", "lsq"] = Field(
        "minmax", description="minmax: moving-average min/max, frozen after the warm-up; lsq: the same warm-up, then "
        "the scales are learned (LSQ, Esser et al. 2020) with the model."
    )
    observer_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Weight of the history in the moving average: "
                                     "running = momentum * running + (1 - momentum) * batch.")
    freeze_after_steps: int = Field(100, ge=0, description="QAT: optimizer steps of observer warm-up from the start "
                                    "step; the ranges (and PEG permutations) are frozen after them.")
    calibration_batches: int | None = Field(None, ge=1, description="PTQ: training batches to calibrate on "
                                            f"(default {DEFAULT_CALIBRATION_BATCHES}).")
    activation_scheme: Literal["asymmetric", "symmetric"] = Field(
        "asymmetric", description="uint8 activation codes; asymmetric: zero point from the range; symmetric: zero "
        "point 128."
    )
    activations: ActivationsConfig = Field(ActivationsConfig(), description="Which activations are quantized.")
    peg: PegConfig | None = Field(None, description="Per-embedding-group quantization of chosen activations; "
                                  "null: per tensor everywhere.")
    keep_16bit: tuple[str, ...] = Field((), description="Regexes of activation points kept in 16-bit floating point "
                                        "(not quantized to 8 bits): mixed precision.")
    include: tuple[str, ...] = Field(
        DEFAULT_INCLUDE, min_length=1, description="Regexes searched in module names of Linear layers; default: the "
        "encoder's Linear layers (as pruning)."
    )
    exclude: tuple[str, ...] = Field((), description="Regexes; a matching Linear layer is not quantized.")
    embeddings: bool = Field(
        True, description="Word embeddings as int8 with one scale per row (symmetric), as the export stores them "
        "(a quarter of their float32 size, the largest tensor of a small encoder): the model trains and is "
        "evaluated with the rows it will be exported with. false: float32, and the export keeps them float32."
    )
    weight_bits: Literal[8, 4] = Field(
        8, description="Bits of the Linear weights, symmetric per output channel: 8 (codes -127..127) or 4 (codes "
        "-7..7, trained as such in QAT; the artifact packs two codes per byte and the runtime unpacks them at load to "
        "the int8 codes its kernels take, so the numbers are the trained ones). Activations stay 8-bit (W4A8)."
    )
    weight_group_size: int | None = Field(
        None, ge=8, description="mode: ptq only: group-wise round-to-nearest weights, one scale (and zero point) per "
        "group of this many consecutive input features of a row (Intel Neural Compressor's RTN weight-only mode); "
        "must divide every quantized layer's in_features. An evaluation mode: the artifact stores per-channel codes "
        "only, so such a model is not exported. null: one scale per output channel."
    )
    weight_scheme: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="Group-wise weights (weight_group_size): symmetric codes, or asymmetric codes "
        "0..2**bits-1 with a zero point per group (the range includes 0, so pruned weights stay 0)."
    )
    weight_format: Literal["int", "e4m3", "e5m2", "e3m4"] = Field(
        "int", description="int: integer codes (weight_bits); e4m3 / e5m2 / e3m4: FP8 fake quantization of the "
        "Linear weights (saturating, round to nearest even, a scale per tensor or per output channel: "
        "fp8_granularity). FP8 is emulation only: it measures accuracy, makes nothing faster, and is not exported."
    )
    activation_format: Literal["int", "e4m3", "e5m2", "e3m4"] = Field(
        "int", description="int: uint8 codes (activation_scheme, peg); e4m3 / e5m2 / e3m4: FP8 fake quantization "
        "of the quantized activations, a scale per tensor or per feature (fp8_granularity) from the observed "
        "range. Emulation only, as weight_format."
    )
    fp8_granularity: Literal["tensor", "channel"] | None = Field(
        None, description="FP8 scales: one per tensor (default) or per channel (per output channel of a weight, "
        "per feature of an activation); only with an FP8 weight_format or activation_format."
    )
    rounding: Literal["nearest", "signround"] = Field(
        "nearest", description="How integer weights are rounded. nearest: round to nearest; signround (mode: ptq "
        "only): SignRound, rounding offsets and a clipping per output channel learned by signed gradient descent, "
        "encoder layer by encoder layer, against the float layer's output on calibration_batches training batches "
        "(pruned weights stay 0); the result is per-channel codes, exported like any weight_bits model."
    )
    signround_iters: int | None = Field(None, ge=1, description="SignRound steps per encoder layer (default 200).")
    signround_lr: float | None = Field(None, gt=0, description="SignRound step size at the start, decaying linearly "
                                       "to 0 (default 1 / signround_iters).")
    teq: bool = Field(
        False, description="mode: ptq, integer weights: TEQ before rounding, where a BERT layer allows folding it: a "
        "scale per channel of the attention output projection's input, learned against that projection's float "
        "output on calibration_batches and folded into it and into the value projection (the same float function; "
        "the other Linear layers do not fold, docs/lowbit.md). Pruned weights stay 0.")
    teq_iters: int | None = Field(None, ge=1, description="TEQ Adam steps per encoder layer (default 300).")
    embedding_bits: Literal[8, 4, 2] = Field(
        8, description="Bits per word-embedding value with embeddings: true. 8: int8, symmetric, a scale per row; 4: "
        "int4, symmetric full range (codes -8..7), a signed scale per row, two codes per byte in the artifact; 2: "
        "codes 0..3 with a scale and an offset per row, the range chosen per row by a squared-error search, four "
        "codes per byte. Trained (QAT) and stored (export) the same way; the runtime decodes rows at lookup."
    )

    @field_validator("include", "exclude", "keep_16bit", mode="before")
    @classmethod
    def _list(cls, v):
        return _listify(v)

    @model_validator(mode="after")
    def _check(self):
        check_patterns(self.include, "include")
        check_patterns(self.exclude, "exclude")
        check_patterns(self.keep_16bit, "keep_16bit")
        if self.start_step is not None and self.start_epoch is not None:
            raise FieldError("start_epoch", "give start_step or start_epoch, not both")
        if self.mode == "ptq":
            for name in ("start_step", "start_epoch"):
                if getattr(self, name) is not None:
                    raise FieldError(name, "applies to mode: qat only; mode: ptq calibrates without training")
            if self.observer == "lsq":
                raise FieldError("observer", "lsq learns its scales during training; mode: ptq only calibrates: use "
                                             "observer: minmax")
        else:
            if self.calibration_batches is not None:
                raise FieldError("calibration_batches", "applies to mode: ptq only; QAT calibrates during its "
                                                        "warm-up (freeze_after_steps)")
            if self.freeze_after_steps < 1:
                raise FieldError("freeze_after_steps", "QAT needs at least 1 optimizer step of observer warm-up to "
                                                       "set the activation ranges")
        if self.weight_group_size is not None and self.mode != "ptq":
            raise FieldError("weight_group_size", "group-wise round-to-nearest is a post-training mode: use mode: "
                                                  "ptq, or per-channel weights (weight_group_size: null) for QAT")
        if self.weight_scheme == "asymmetric" and self.weight_group_size is None:
            raise FieldError("weight_scheme", "asymmetric weights need weight_group_size (group-wise RTN); per-channel "
                                              "weights are symmetric, the codes the kernels take")
        fp8_w, fp8_a = self.weight_format != "int", self.activation_format != "int"
        if self.fp8_granularity is not None and not (fp8_w or fp8_a):
            raise FieldError("fp8_granularity", "applies to FP8 formats only: set weight_format or activation_format "
                                                "to e4m3, e5m2 or e3m4")
        if fp8_w and (self.weight_bits != 8 or self.weight_group_size is not None):
            which = "weight_bits" if self.weight_bits != 8 else "weight_group_size"
            raise FieldError(which, f"{which} applies to integer weights (weight_format: int), not to "
                                    f"weight_format: {self.weight_format}")
        if fp8_a and self.peg is not None:
            raise FieldError("peg", "PEG groups are for uint8 activations; FP8 activations (activation_format: "
                                    f"{self.activation_format}) take fp8_granularity: channel instead")
        if fp8_a and self.observer == "lsq":
            raise FieldError("observer", "lsq learns uint8 activation scales; use observer: minmax with FP8 "
                                         "activations")
        if self.rounding == "signround":
            if self.mode != "ptq":
                raise FieldError("rounding", "signround is a post-training method: use mode: ptq")
            if self.weight_format != "int" or self.weight_group_size is not None:
                raise FieldError("rounding", "signround learns per-channel integer codes: use weight_format: int and "
                                             "weight_group_size: null")
        else:
            for name in ("signround_iters", "signround_lr"):
                if getattr(self, name) is not None:
                    raise FieldError(name, f"{name} applies to rounding: signround only")
        if self.teq and (self.mode != "ptq" or self.weight_format != "int" or self.weight_group_size is not None):
            raise FieldError("teq", "TEQ learns scales for per-channel integer weights after training: use mode: ptq, "
                                    "weight_format: int and weight_group_size: null")
        if self.teq_iters is not None and not self.teq:
            raise FieldError("teq_iters", "teq_iters applies to teq: true only")
        if self.embedding_bits != 8 and not self.embeddings:
            raise FieldError("embedding_bits", f"embedding_bits: {self.embedding_bits} needs embeddings: true (the "
                                               f"word embeddings are not quantized with embeddings: false)")
        if not (self.activations.linear_inputs or self.activations.residual_sums or self.activations.layernorm_outputs):
            if self.peg is not None:
                raise FieldError("peg", "no activation is quantized (activations: all false): nothing for PEG to "
                                        "group")
        return self

    # -- derived values ------------------------------------------------------------------------------------

    @property
    def fp8(self) -> bool:
        """True when weights or activations are FP8 (emulation: nothing to export)."""
        return self.weight_format != "int" or self.activation_format != "int"

    @property
    def fp8_per_channel(self) -> bool:
        return self.fp8_granularity == "channel"

    @property
    def exportable(self) -> bool:
        """True when the conversion can be exported: integer per-channel weights (no FP8, no group-wise RTN)."""
        return not self.fp8 and self.weight_group_size is None

    @property
    def uses_epochs(self) -> bool:
        return self.start_epoch is not None

    @property
    def num_calibration_batches(self) -> int:
        return self.calibration_batches or DEFAULT_CALIBRATION_BATCHES

    def resolve_start(self, steps_per_epoch: int | None = None) -> int:
        """The QAT start in optimizer steps; epochs need ``steps_per_epoch``."""
        if not self.uses_epochs:
            return self.start_step or 0
        return epochs_to_steps(self.start_epoch, steps_per_epoch)

    def check_recipe(self, recipe) -> None:
        """Against the rest of the recipe: PTQ trains nothing (no other technique), QAT starts within training and
        not before the end of a pruning window."""
        others = [t.kind for t in recipe.techniques if t.kind != self.kind]
        if self.mode == "ptq":
            if others:
                raise FieldError("mode", f"mode: ptq calibrates a trained model without training, but the recipe also "
                                         f"has {', '.join(others)}, which need training: run that recipe first, then "
                                         f"ptq on its run directory (model.name_or_path), or use mode: qat")
            return
        check_start_within_training(self.start_step, self.start_epoch, recipe.training, "QAT would never run")
        pruning = next((t for t in recipe.techniques if t.kind == "pruning"), None)
        if pruning is None:
            return
        field = "start_epoch" if self.uses_epochs else "start_step"
        if pruning.uses_epochs != self.uses_epochs:
            unit = "epochs (end_epoch)" if pruning.uses_epochs else "steps (end_step)"
            raise FieldError(field, f"the pruning window is given in {unit}: give the QAT start in the same unit "
                                    f"({'start_epoch' if pruning.uses_epochs else 'start_step'}) so that its order "
                                    f"against the pruning end can be checked")
        if self.uses_epochs:
            if self.start_epoch < pruning.end_epoch:
                raise FieldError(field, f"QAT starts at epoch {self.start_epoch:g}, before pruning ends (end_epoch "
                                        f"{pruning.end_epoch:g}): start quantization-aware training once the masks are "
                                        f"final (start_epoch >= {pruning.end_epoch:g})")
        elif (self.start_step or 0) < pruning.end_step:
            raise FieldError(field, f"QAT starts at step {self.start_step or 0}, before pruning ends (end_step "
                                    f"{pruning.end_step}): start quantization-aware training once the masks are final "
                                    f"(start_step >= {pruning.end_step})")
