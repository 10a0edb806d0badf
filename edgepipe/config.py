"""The pipeline config: validated data with a default and a description on every field.

A config file is YAML loaded safely (``edgepipe.yamlfile``: no recursive or alias-bomb values, no duplicate
keys); unknown keys are rejected with the file and field named. The resolved config (defaults filled in) is written to every run folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from edgepipe.errors import EdgepipeError, format_validation_error
from edgepipe.types import DType, Importance


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/NaN in a config is always a mistake


DETECTION_KINDS = ("digit-canvases", "coco", "voc", "yolo")
DETECTION_FIELDS = ("annotations", "images", "classes", "canvas_images")
"""data fields only detection kinds read (left out of the keys of other kinds, whose runs predate them)."""
TEXT_KINDS = ("text", "text-synthetic")
TEXT_FIELDS = ("text_column", "label_column", "max_length", "choice_split", "tokenizer", "synthetic_sentences")
"""data fields only text kinds read (left out of the keys of other kinds, whose runs predate them)."""
LATER_DEFAULTS = {"data": {"val_from_train": None, "val_from_train_seed": 0, "unlabeled": None},
                  "distill": {"loss": "kd", "dkd_alpha": 1.0, "dkd_beta": 8.0, "pseudo_label_threshold": None,
                              "assistants": []},
                  "prune": {"heads": 0.0, "vocabulary": "keep"}}
"""Fields added after runs were made, with the value that reproduces those runs: left out of the stage keys while they
hold it, so every earlier run's keys hold (edgepipe.engine.pipeline._keyed_config)."""
LATER_NESTED_DEFAULTS = {"hf": None, "optimizer": "sgd"}
"""The same for fields of sections that appear at several places (a model spec's hf, an optimizer's choice): left out
wherever they hold this value."""


class DataConfig(_Strict):
    kind: Literal["digits", "imagefolder", "digit-canvases", "coco", "voc", "yolo", "text", "text-synthetic"] = Field(
        "digits", description="digits: scikit-learn's embedded 8x8 digits; imagefolder: a folder of class folders. "
                              "Detection (task detection): digit-canvases (embedded: digits placed on canvases), coco "
                              "(instances JSON), voc (Pascal VOC) or yolo (images/ and labels/ folders). Text (task "
                              "text): text (TSV, CSV or JSON Lines files under path, one per split) or text-synthetic "
                              "(embedded: generated sentiment sentences).")
    path: str | None = Field(None, description="imagefolder: root holding train/ and val/ (or test/) folders; coco, "
                                                "voc, yolo: the dataset root.")
    annotations: str = Field("annotations/instances_{split}.json",
                             description="coco: each split's instances file under path ({split}: the split's name).")
    images: str = Field("{split}", description="coco: each split's image folder under path ({split}: its name).")
    classes: list[str] | None = Field(
        None, description="voc and text: the class names, in label order (None: the names the training split uses, "
                          "sorted; text labels that are all integers: 0..K-1); coco and yolo read theirs from the "
                          "files.")
    text_column: str = Field("sentence", description="text: the column (JSON Lines: the field) holding the text.")
    label_column: str = Field("label", description="text: the column (JSON Lines: the field) holding the label.")
    max_length: int = Field(128, ge=8, le=8192, description="text: tokens per sentence at most (special tokens "
                                                            "included); longer ones are truncated. Batches are "
                                                            "padded to their own longest sentence.")
    choice_split: str | None = Field(
        None, description="text: a labelled split (file) every choice is made on (each epoch's validation metric, "
                          "sweeps, the gain check, the accuracy budget), e.g. dev; val_split is then only reported. "
                          "None: data.val_from_train, or the validation split itself.")
    tokenizer: str | None = Field(None, description="text: the Hugging Face folder whose tokenizer reads the text "
                                                    "(None: the teacher's model.hf folder).")
    synthetic_sentences: int = Field(2000, ge=20, description="text-synthetic: training sentences generated "
                                                              "(validation: a quarter as many, drawn apart).")
    canvas_images: int = Field(512, ge=1, description="digit-canvases: training canvases (validation: a quarter as "
                                                      "many, from digit images never seen in training).")
    train_split: str = Field("train", description="imagefolder: sub-folder with training images.")
    val_split: str = Field("test", description="imagefolder: sub-folder with validation images.")
    image_size: int | None = Field(
        None, gt=0, description="imagefolder: resize the shorter side to image_size / crop_fraction, then take the "
                                "centre image_size x image_size (torchvision Resize + CenterCrop); None keeps the "
                                "stored size. digits: resize to this square size.")
    crop_fraction: float = Field(
        1.0, gt=0, le=1, description="imagefolder with image_size: the centre crop's share of the resized shorter "
                                     "side (1.0: the whole shorter side; 0.875 is the usual ImageNet evaluation crop).")
    channels: Literal[1, 3] | None = Field(
        None, description="imagefolder: 1 (grayscale) or 3 (RGB) channels per image; None follows the teacher's first "
                          "layer. Every image is converted explicitly (16-bit scaled, not clipped; alpha dropped; "
                          "palette, CMYK and others to RGB or luma) and the conversions are recorded in the run.")
    strict: bool = Field(False, description="imagefolder: stop at the first unreadable image instead of skipping it "
                                            "with a warning (skipped files are counted in the run and the report).")
    streaming: bool | Literal["auto"] = Field(
        "auto", description="imagefolder: read images from disk batch by batch through a torch DataLoader with "
                            "worker processes (true), hold every decoded image in memory (false), or stream when the "
                            "decoded images would take more than memory_limit_mb (auto).")
    memory_limit_mb: float = Field(2048, gt=0, description="streaming: auto streams above this many MiB of decoded images.")
    workers: int | None = Field(None, ge=0, description="streaming: DataLoader worker processes (None: one per CPU "
                                                        "core this process may use, at most 8; 0: decode in-process).")
    mean: tuple[float, ...] | None = Field(None, description="Per-channel normalization mean (None: data default).")
    std: tuple[float, ...] | None = Field(None, description="Per-channel normalization std (None: data default).")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="digits: fraction held out for validation.")
    augment: bool = Field(True, description="Random crop (reflect pad) and horizontal flip while training.")
    hflip: bool = Field(True, description="Use horizontal flips in augmentation (off for digits).")
    batch_size: int = Field(64, gt=0, description="Training batch size.")
    eval_batch_size: int = Field(256, gt=0, description="Batch size for accuracy evaluation.")
    limit_train: int | None = Field(None, gt=0, description="Use only N training samples, the first of every class in turn (tests, quick runs).")
    limit_val: int | None = Field(None, gt=0, description="Use only N validation samples, the first of every class in turn (tests, quick runs).")
    val_from_train: float | None = Field(
        None, gt=0, description="Carve a held-out split from the training images (a fraction below 1, or a number of "
                                "images), stratified by class and seeded by data.val_from_train_seed. Every choice is "
                                "then made on it: each epoch's validation metric, sweeps (`edgepipe sweep`), the gain "
                                "check and the QAT accuracy budget; the validation split (val_split) is only reported. "
                                "None: choices and reports share the validation split.")
    val_from_train_seed: int = Field(0, ge=0, description="Seed of the held-out split's draw (fixed apart from the run's "
                                                          "seed, so runs at several seeds choose on the same images).")
    unlabeled: str | None = Field(
        None, description="imagefolder: images without labels for distillation: a folder (any layout; a file that is "
                          "also a training image is skipped), or 'rest': the training images data.limit_train leaves "
                          "out. The distill stage trains on them with the teacher's soft targets alone (alpha > 0), "
                          "optionally with hard pseudo-labels (distill.pseudo_label_threshold); other stages never "
                          "see them.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.kind in ("imagefolder", "coco", "voc", "yolo", "text") and not self.path:
            raise ValueError(f"path: {self.kind} data needs a path to the dataset root")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"std: every value must be > 0 (it divides the pixels), got {list(self.std)}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean and std: one value per channel each, got {len(self.mean)} and {len(self.std)}")
        if self.val_from_train is not None and self.val_from_train >= 1 and self.val_from_train != int(self.val_from_train):
            raise ValueError(f"val_from_train: {self.val_from_train:g} is neither a fraction below 1 nor a whole number "
                             "of images")
        return self


class ModelSpec(_Strict):
    """How to build a model: a registered architecture, a torch.export file, or a factory."""

    arch: str | None = Field(None, description="Registered architecture name (see `edgepipe models`).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the architecture.")
    weights: str | None = Field(None, description="State-dict file for `arch` (loaded with weights_only=True).")
    program: str | None = Field(None, description="A torch.export program file (.pt2).")
    trust_pickle: bool = Field(
        False, description="program: allow a .pt2 whose tensors or constants need full unpickling, which can run "
                           "code from the file (off: such a file is refused). Only for files from a trusted source.")
    factory: str | None = Field(None, description="Explicit 'module:function' returning an nn.Module.")
    hf: str | None = Field(None, description="A Hugging Face model folder (save_pretrained's; loaded offline with "
                                             "local_files_only) given a sequence-classification head for the data's "
                                             "classes, or embedded:tiny-bert (the embedded text default).")
    _origin: str | None = PrivateAttr(None)
    """The run-folder file this spec was read from (its config.yaml, a model.json); None: given to this command.
    A factory or trust_pickle from such a file is honoured only when the user's own config names the same
    (edgepipe.models.trust.check_trusted): a run folder is data, never code."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        sources = [s for s in (self.arch, self.program, self.factory, self.hf) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one of arch, program, factory or hf")
        if self.factory and ":" not in self.factory:
            raise ValueError(f"factory: expected 'module:function', got {self.factory!r}")
        return self


class OptimConfig(_Strict):
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd: SGD with Nesterov momentum (CNNs); adamw: AdamW (betas 0.9/0.999, decoupled "
                           "weight_decay; what transformers are fine-tuned with). Both under the one-cycle schedule.")
    epochs: int = Field(10, ge=0, description="Training epochs.")
    lr: float = Field(0.1, gt=0, description="Peak learning rate (one-cycle schedule).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov).")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay.")
    autocast: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="Mixed precision while training (edgepipe.device.precision). On the CPU, auto uses bf16 "
                            "only where the CPU has native bf16 (AMX/AVX512-BF16); fp16 is refused there. On a CUDA "
                            "GPU, auto uses bf16 where the GPU has it (compute capability 8.0+), else fp16 with a "
                            "gradient scaler.")
    channels_last: bool = Field(False, description="Train with channels-last memory format.")


class TeacherConfig(_Strict):
    model: ModelSpec = Field(description="The teacher model (trained below when train.epochs > 0).")
    train: OptimConfig = Field(OptimConfig(epochs=0), description="Train the teacher first (0 epochs: use as is).")

    @model_validator(mode="after")
    def _program_is_inference_only(self) -> TeacherConfig:
        if self.model.program and self.train.epochs > 0:
            raise ValueError("train.epochs: a torch.export program (model.program) is inference-only; give arch + "
                             "weights (or a factory) to train the teacher, or set epochs: 0")
        return self


class FeaturePair(_Strict):
    teacher: str = Field(description="Teacher module name whose output is the hint (e.g. layer3).")
    student: str = Field(description="Student module name matched to it through a learned 1x1 adapter.")


class SoftTargetsConfig(_Strict):
    """How distill, prune and qat obtain the frozen teacher's logits."""

    runtime: Literal["torch", "openvino"] = Field(
        "torch", description="torch: the teacher module itself; openvino: the teacher compiled by OpenVINO in "
                             "FP32 (inference only, the same logits to ~1e-5, faster on CPU). Feature hints need torch.")
    cache: bool = Field(False, description="Keep each batch's teacher logits, keyed by the batch's bytes, in memory "
                                           "and in the run's cache/ folder, so later stages, resumed runs and the "
                                           "baselines reuse them (the data order and augmentation depend only on "
                                           "seed and epoch).")


class DistillConfig(_Strict):
    enabled: bool = Field(True, description="Run knowledge distillation.")
    student: ModelSpec = Field(description="The student architecture.")
    init: Literal["random", "teacher"] = Field(
        "random", description="teacher: start the student from the teacher's weights, taking evenly spaced "
                              "blocks of each stage where the student is shallower (same widths required).")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T of the soft targets.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the soft (KL) term; 1-alpha weighs the hard CE.")
    loss: Literal["kd", "dkd"] = Field(
        "kd", description="The soft term: kd (Hinton et al. 2015, KL of the tempered distributions) or dkd (decoupled "
                          "KD, Zhao et al. 2022: dkd_alpha x target-class KD + dkd_beta x non-target-class KD, each "
                          "scaled by T^2; classification).")
    pseudo_label_threshold: float | None = Field(
        None, gt=0, le=1, description="data.unlabeled: an unlabeled image whose teacher probability of its top class "
                                      "(softmax at T=1) reaches this also gets that class as a hard label (None: soft "
                                      "targets only).")
    dkd_alpha: float = Field(1.0, ge=0, description="dkd: weight of the target-class term (TCKD).")
    dkd_beta: float = Field(8.0, ge=0, description="dkd: weight of the non-target-class term (NCKD); the paper's "
                                                   "CIFAR-100 setting is 8.")
    beta: float = Field(0.0, ge=0, description="Weight of the feature-hint (MSE) term.")
    assistants: list[ModelSpec] = Field(
        default_factory=list, description="Teacher assistants (Mirzadeh et al. 2020): teacher -> assistants[0] -> ... -> "
                                          "student, each step distilled with these settings and cached as a run of its "
                                          "own (RUN/assistants/<i>); the student learns from the last assistant.")
    feature_pairs: list[FeaturePair] = Field(default_factory=list, description="Teacher/student layer pairs.")
    optim: OptimConfig = Field(OptimConfig(), description="Student training.")


class PruneConfig(_Strict):
    enabled: bool = Field(True, description="Run structured channel pruning.")
    target: Literal["macs", "params", "latency"] = Field(
        "macs", description="What pruning constrains: MACs or params (``ratio``), or batch-1 latency measured on "
                            "the target's backend (``latency_ms`` or ``speedup``).")
    ratio: float = Field(0.5, gt=0, lt=1, description="Keep at most this fraction of MACs (or params).")
    latency_ms: float | None = Field(
        None, gt=0, description="target latency: prune until the batch-1 p50 on the target's backend is at most this.")
    speedup: float | None = Field(
        None, gt=1, description="target latency: prune until the batch-1 p50 is this many times lower than the "
                                "unpruned student's, measured the same way.")
    latency_check: float = Field(
        0.03, gt=0, lt=1, description="target latency: measure a candidate each time its MACs have dropped by this "
                                      "fraction of the unpruned student's since the last measurement.")
    importance: Importance = Field(Importance.MAGNITUDE, description="Channel importance criterion.")
    steps: int = Field(4, ge=1, description="Iterative pruning steps to reach the ratio.")
    finetune_per_step: int = Field(0, ge=0, description="Fine-tuning epochs between steps.")
    taylor_batches: int = Field(4, ge=1, description="Batches used to accumulate gradients for Taylor importance.")
    global_pruning: bool = Field(False, description="Rank channels globally instead of per layer.")
    max_layer_ratio: float = Field(0.8, gt=0, lt=1, description="Never prune more than this fraction of one layer.")
    round_to: int | None = Field(None, ge=1, description="Keep channel counts a multiple of this (e.g. 8).")
    ignore: list[str] = Field(default_factory=list, description="Module names never pruned (the classifier always is).")
    heads: float = Field(0.0, ge=0, lt=1, description="text: the share of each layer's attention heads removed (whole "
                                                        "heads, least important first, at least one kept), before "
                                                        "FFN width and hidden size are pruned to the target.")
    vocabulary: Literal["keep", "trim"] = Field(
        "keep", description="text: trim keeps only the word embeddings of token ids the training split produces (and "
                            "the tokenizer's special tokens; any other id reads [UNK]'s row), first; the model still "
                            "takes the tokenizer's ids.")
    temperature: float = Field(4.0, gt=0, description="Distillation temperature while fine-tuning.")
    alpha: float = Field(0.9, ge=0, le=1, description="Soft-target weight while fine-tuning.")
    optim: OptimConfig = Field(OptimConfig(epochs=5, lr=0.05), description="Fine-tuning after the last step.")

    @model_validator(mode="after")
    def _budget(self) -> PruneConfig:
        if self.target == "latency" and (self.latency_ms is None) == (self.speedup is None):
            raise ValueError("target latency needs exactly one of latency_ms (a budget in ms) or speedup (a factor)")
        if self.target != "latency" and (self.latency_ms is not None or self.speedup is not None):
            raise ValueError(f"latency_ms/speedup apply to target: latency, not target: {self.target}")
        return self


class QATConfig(_Strict):
    enabled: bool = Field(True, description="Run QAT when the target lists int8.")
    calibration_batches: int = Field(8, ge=1, description="Batches used to calibrate activation ranges.")
    calibration: Literal["max", "percentile"] = Field("percentile", description="Activation range estimator.")
    percentile: float = Field(99.99, gt=50, le=100, description="Percentile for the percentile estimator.")
    activations: Literal["auto", "int8", "uint8_after_relu"] = Field(
        "auto", description="Activation form: int8 zero-point 0 everywhere (TensorRT), or uint8 zero-point 0 where "
                            "the graph proves a tensor non-negative (after ReLU; OpenVINO/ONNX Runtime on x86). auto: "
                            "from the target's backend (edgepipe.quantization.form).")
    weight_bits: Literal["auto", 7, 8] = Field(
        "auto", description="8: weights in [-127, 127]. 7: [-63, 63], for x86 CPUs without VNNI/AMX, whose u8 x s8 "
                            "multiply-adds saturate with 8-bit weights. auto: from the target and this host's CPU.")
    temperature: float = Field(4.0, gt=0, description="Distillation temperature while fine-tuning.")
    alpha: float = Field(0.9, ge=0, le=1, description="Soft-target weight while fine-tuning.")
    optim: OptimConfig = Field(OptimConfig(epochs=2, lr=0.005, autocast="off"), description="QAT fine-tuning.")
    max_drop: float | None = Field(
        None, ge=0, le=100, description="Accuracy budget: points of top-1 the INT8 model may lose against the stage's "
                                        "float input. When all-INT8 loses more, Conv/Linear layers return to "
                                        "fallback_dtype, the most sensitive first, until it holds (edgepipe.quantization.mixed). "
                                        "null: every Conv/Linear INT8, no sensitivity analysis.")
    fallback_dtype: Literal["auto"] | DType = Field(
        "auto", description="Precision of the layers an INT8 model keeps in float (the budget's float layers, and "
                            "ops such as hard-swish that are never quantized). auto: the target's best float dtype "
                            "the runtime reports for this host (fp16 on a Jetson; bf16 on a CPU whose OpenVINO "
                            "reports BF16, else fp32).")
    budget_split: str | None = Field(
        None, description="ImageFolder split (a folder under data.path) the budget is measured on, held out from "
                          "training and validation; null: the validation split.")
    budget_images: int | None = Field(
        None, ge=10, description="Measure the budget and the per-layer sensitivity on this many images of that split, "
                                 "every class in turn (null: all). Each layer costs one pass over them.")


class ExportConfig(_Strict):
    opset: int = Field(17, ge=17, description="ONNX opset (>= 17).")
    float_tolerance: float = Field(1e-3, gt=0, description="Max abs logit difference ORT vs PyTorch (float).")
    int8_min_agreement: float = Field(0.99, gt=0, le=1, description="Min top-1 agreement ORT vs PyTorch (INT8).")


class CompileConfig(_Strict):
    dtype: Literal["auto"] | DType = Field(
        "auto", description="Precision to compile to. auto: int8 for a QAT model on a target with int8, else the "
                            "profile's best float dtype; a fixed dtype must be one the target lists.")
    max_top1_drop: float = Field(
        0.3, ge=0, le=100, description="Points of top-1 the compiled model may lose against the exported ONNX run in "
                                       "ONNX Runtime on the same validation images; more fails the compile stage.")
    device_val_images: int = Field(
        1000, ge=1, description="A TensorRT deploy bundle carries this many validation images (at most 32 MiB of "
                                "them) so the device measures the engine's top-1.")


class PTQConfig(_Strict):
    subset_size: int = Field(300, ge=1, description="Un-augmented training images NNCF calibrates on (NNCF's "
                                                    "default subset size).")
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="nncf.QuantizationPreset: performance = symmetric activations and weights.")


class MeasureConfig(_Strict):
    warmup: int = Field(10, ge=0, description="Untimed iterations before timing.")
    iterations: int = Field(50, ge=1, description="Timed iterations per latency figure.")
    throughput_batch: int = Field(32, ge=1, description="Batch size for the throughput figure.")
    threads: int | None = Field(None, ge=1, description="Inference threads (None: all cores).")


class BenchConfig(_Strict):
    batch_sizes: list[int] = Field([1, 8, 32], description="Batch sizes measured by `edgepipe bench`.")
    warmup: int = Field(10, ge=0, description="Untimed iterations per measurement.")
    iterations: int = Field(30, ge=1, description="Timed iterations per measurement.")


class PipelineConfig(_Strict):
    name: str = Field("edgepipe-run", description="A name for the recipe.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for data order, initialisation and augmentation "
                                                    "(0 <= seed < 2**32, what numpy accepts).")
    on_no_gain: Literal["flag", "skip"] = Field(
        "flag", description="A stage whose output is less accurate than its input and not faster on the target by "
                            "the profile's min_speedup: flag it in the report, or skip it (pass its input through).")
    device: str = Field(
        "auto", description="Where PyTorch trains and evaluates (every stage that runs PyTorch): auto (a CUDA GPU when "
                            "PyTorch sees one, else the CPU), cpu, cuda or cuda:N. Under torchrun each process takes "
                            "the GPU of its LOCAL_RANK. Not part of any stage's key: a stage trained on a GPU is reused "
                            "(and resumes) on a CPU and the other way round; the device that trained it is recorded.")
    task: str | None = Field(
        None, description="What the model does (edgepipe.tasks: its inputs, outputs, losses and metrics): "
                          "classification, or a registered task. Default: what data.kind implies (digits and "
                          "imagefolder: classification); the resolved name is written to the run's config.")
    data: DataConfig = Field(DataConfig(), description="The dataset.")
    teacher: TeacherConfig = Field(description="Where the teacher comes from.")
    distill: DistillConfig = Field(description="Knowledge distillation into the student.")
    soft_targets: SoftTargetsConfig = Field(SoftTargetsConfig(), description="How the teacher's logits are computed.")
    prune: PruneConfig = Field(PruneConfig(), description="Structured pruning and fine-tuning.")
    qat: QATConfig = Field(QATConfig(), description="INT8 quantization-aware training.")
    export: ExportConfig = Field(ExportConfig(), description="ONNX export and checks.")
    compile: CompileConfig = Field(CompileConfig(), description="Compile precision and fidelity check.")
    ptq: PTQConfig = Field(PTQConfig(), description="NNCF post-training quantization (the ptq stage, a baseline).")
    measure: MeasureConfig = Field(MeasureConfig(), description="Latency measurement at every stage.")
    bench: BenchConfig = Field(BenchConfig(), description="`edgepipe bench` sweep.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        """Checked here, against the grammar; whether this machine has it, when a stage runs (edgepipe.device)."""
        from edgepipe.device import parse

        try:
            kind, index = parse(v)
        except EdgepipeError as e:
            raise ValueError(str(e).split(": ", 1)[1]) from None
        return kind if index is None else f"{kind}:{index}"


def configs_dir() -> Path:
    """Shipped recipes: ``configs/`` beside the package (checkout or wheel)."""
    from importlib import resources

    return Path(str(resources.files("configs")))


def resolve_config_path(name: str | Path) -> Path:
    """The file ``--config NAME`` means: NAME itself when it is a file, else the shipped recipe ``NAME`` (a folder
    is never a config, so a local ``digits/`` folder does not hide the ``digits`` recipe). When both could be meant,
    a warning says which was used."""
    import logging

    p = Path(name)
    plain = str(name) and "/" not in str(name) and not p.suffix
    recipe = configs_dir() / f"{name}.yaml" if plain else None
    if p.is_file():
        if recipe is not None and recipe.is_file():
            logging.getLogger("edgepipe").warning("config %s: using the file ./%s, not the shipped recipe of that name "
                                                  "(%s)", name, p, recipe)
        return p
    if recipe is not None and recipe.is_file():
        if p.exists():
            logging.getLogger("edgepipe").warning("config %s: ./%s is a folder, not a config file; using the shipped "
                                                  "recipe %s", name, p, recipe)
        return recipe
    recipes = ", ".join(sorted(f.stem for f in configs_dir().glob("*.yaml")))
    if p.is_dir():
        raise EdgepipeError(f"{p}: is a folder, not a config file; give the path of a YAML file or a shipped recipe "
                            f"name ({recipes})")
    if not p.exists():
        raise EdgepipeError(f"{p}: config file not found; give the path of a YAML file or a shipped recipe name "
                            f"({recipes})")
    return p  # a pipe or device (e.g. /dev/stdin): read_yaml reads it, up to its size limit


def load_config(path: str | Path) -> PipelineConfig:
    """Load and validate a config YAML (or a shipped recipe by name, e.g. ``digits``; see resolve_config_path)."""

    p = resolve_config_path(path)
    return validate_config(_read_extended(p, ()), p)


def _read_extended(p: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's mapping; with ``extends: OTHER`` (a file, or a shipped recipe name) that config's mapping with
    this one merged over it, section by section (a mapping merges key by key; anything else, a list included,
    replaces; ``null`` resets a field to its default)."""
    from edgepipe.yamlfile import read_yaml

    data = read_yaml(p, "config file")
    if not isinstance(data, dict):
        raise EdgepipeError(f"{p}: expected a mapping of config sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise EdgepipeError(f"{p}: extends: expected a config file or shipped recipe name, got {parent!r}")
    q = resolve_config_path(parent if Path(parent).is_absolute() or "/" not in parent and not Path(parent).suffix
                            else p.parent / parent)
    if q.resolve() in chain or q.resolve() == p.resolve():
        raise EdgepipeError(f"{p}: extends: {parent} leads back to itself; remove the loop")
    return _merged(_read_extended(q, (*chain, p.resolve())), data)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def validate_config(data: dict[str, Any], source: str | Path = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise EdgepipeError(format_validation_error(source, e)) from None
