"""Load the teacher, and load or derive the student, with transformers Auto classes.

Weights come through safetensors only, and model code shipped with a checkpoint runs only when
the spec sets ``teacher.trustRemoteCode``. ``student.fromTeacher`` either keeps evenly spaced
teacher layers with their weights (DistilBERT-style; GPT2, Llama-family and BERT-family layer
names are recognised) or, with a smaller width or head count, starts a fresh model of the same
architecture.

With ``meta_student`` (a student split by tensor or pipeline parallelism) a student whose weights
are on disk (``student.model``, or teacher layers copied by ``student.fromTeacher``) is built on
the meta device instead, with a ``WeightSource`` naming its safetensors: each rank then reads only
its own slices (``parallel/meta_load.py``).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.api import DistillationJobSpec
from kdistill.api.failures import ExitCode
from kdistill.api.spec import FromTeacher

from .errors import TrainerError
from .sources import resolve_source

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The numbered block list of each supported family: transformer.h.N (GPT2), model.layers.N
# (Llama, Qwen2, Mistral), bert.encoder.layer.N / distilbert.transformer.layer.N (BERT family).
LAYER_KEY = re.compile(r"^(?P<prefix>.*?\b(?:h|layers|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
# Feed-forward widths that scale with hiddenSize when the student is narrower.
FFN_WIDTH_KEYS = ("intermediate_size", "n_inner", "hidden_dim")


@dataclass
class Models:
    teacher: nn.Module | None  # None: the teacher is served (remote_targets.py), no weights here
    student: nn.Module
    tokenizer: Any
    teacher_dir: Path | None  # None: only teacher.endpoint names the teacher
    # Teacher layer each student layer was copied from; empty when the student was loaded or fresh.
    copied_layers: list[int] = field(default_factory=list)
    # The student's own tokenizer when it differs from the teacher's (cross-tokenizer
    # distillation); None when the student reads the teacher's tokens.
    student_tokenizer: Any = None
    # Where a meta-device student's weights are read from (parallel/meta_load.py); None when the
    # student holds real weights.
    student_source: Any = None

    @property
    def cross_tokenizer(self) -> bool:
        return self.student_tokenizer is not None


def auto_model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def evenly_spaced_layers(num_student: int, num_teacher: int) -> list[int]:
    """Teacher layers a student of ``num_student`` layers keeps: the last layer of each of
    ``num_student`` equal segments, so the top layer is always kept (12 → 6 keeps 1,3,5,7,9,11)."""
    if not 1 <= num_student <= num_teacher:
        raise ValueError(f"cannot keep {num_student} of {num_teacher} teacher layers")
    return [round((i + 1) * num_teacher / num_student) - 1 for i in range(num_student)]


def _existing_dir(uri: str, base_dir: Path, what: str) -> Path:
    path = resolve_source(uri, base_dir)
    if not path.is_dir():
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"{what} {uri!r}: no model directory at {path}")
    if not (path / "config.json").is_file():
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"{what} {uri!r}: {path} has no config.json")
    return path


def _load_pretrained(path: Path, task: str, dtype: torch.dtype, trust_remote_code: bool, what: str) -> nn.Module:
    try:
        return auto_model_class(task).from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        # No safetensors weights, an unknown architecture or a config that needs remote code.
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"{what} at {path} cannot be loaded: {exc}") from None


def load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"no usable tokenizer at {path}: {exc}") from None
    if tok.pad_token_id is None:
        # Padding is always masked, so any id works; eos is the usual choice for GPT-style models.
        if tok.eos_token is None:
            raise TrainerError(ExitCode.BAD_SPEC, f"tokenizer at {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _num_layers(config: Any) -> int:
    return int(config.num_hidden_layers)


def derive_student_config(teacher_config: Any, spec: FromTeacher) -> tuple[Any, list[int]]:
    """The student's config, and the teacher layers whose weights it inherits (empty: fresh init)."""
    cfg = copy.deepcopy(teacher_config)
    n_teacher = _num_layers(teacher_config)
    t_width = int(teacher_config.hidden_size)
    t_heads = int(teacher_config.num_attention_heads)
    width = spec.hidden_size or t_width
    heads = spec.num_attention_heads or t_heads
    fresh = width != t_width or heads != t_heads
    if not fresh and spec.num_layers > n_teacher:
        raise TrainerError(
            ExitCode.BAD_SPEC,
            f"student.fromTeacher.numLayers ({spec.num_layers}) exceeds the teacher's {n_teacher} layers; "
            "copying layers needs numLayers <= teacher layers (set hiddenSize for a fresh model)",
        )
    if width % heads:
        raise TrainerError(ExitCode.BAD_SPEC, f"student width {width} is not divisible by {heads} heads")
    cfg.num_hidden_layers = spec.num_layers
    if fresh:
        cfg.hidden_size = width
        cfg.num_attention_heads = heads
        for key in FFN_WIDTH_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and key in cfg.to_dict():
                setattr(cfg, key, max(1, value * width // t_width))
        if getattr(cfg, "head_dim", None) is not None:
            cfg.head_dim = width // heads
        t_kv = getattr(teacher_config, "num_key_value_heads", None)
        if t_kv is not None:
            # Keep the teacher's grouping ratio (MHA stays MHA), rounded to a divisor of heads.
            kv = max(1, heads * int(t_kv) // t_heads)
            while heads % kv:
                kv -= 1
            cfg.num_key_value_heads = kv
    kept = evenly_spaced_layers(spec.num_layers, n_teacher) if spec.num_layers <= n_teacher else []
    layer_types = getattr(teacher_config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_teacher:
        cfg.layer_types = [layer_types[i] for i in kept] if kept else [layer_types[-1]] * spec.num_layers
    return cfg, ([] if fresh else kept)


def copy_teacher_layers(student: nn.Module, teacher: nn.Module, kept: list[int]) -> None:
    """Load the student with the teacher's weights: embeddings, heads and norms as they are,
    student block i from teacher block ``kept[i]``."""
    t_state = teacher.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    seen_layer = False
    for key, s_tensor in student.state_dict().items():
        m = LAYER_KEY.match(key)
        if m:
            seen_layer = True
            t_key = f"{m['prefix']}.{kept[int(m['index'])]}.{m['rest']}"
        else:
            t_key = key
        t_tensor = t_state.get(t_key)
        if t_tensor is None or t_tensor.shape != s_tensor.shape:
            raise TrainerError(
                ExitCode.BAD_SPEC,
                f"cannot copy teacher weights into the student: {t_key!r} "
                f"{'missing' if t_tensor is None else tuple(t_tensor.shape)} vs {tuple(s_tensor.shape)} "
                f"({type(teacher).__name__} is not a supported family for layer copying)",
            )
        new_state[key] = t_tensor.detach().to(dtype=s_tensor.dtype).clone()
    if not seen_layer:
        raise TrainerError(
            ExitCode.BAD_SPEC, f"{type(student).__name__}: no numbered layers found; cannot copy teacher layers"
        )
    student.load_state_dict(new_state, strict=True)


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")


def student_tokenizer_if_different(
    teacher: nn.Module, teacher_tok: Any, student: nn.Module, student_dir: Path
) -> Any | None:
    """The student's own tokenizer when it maps text to ids differently from the teacher's; None
    when the student uses the teacher's tokenizer (or ships none and has the teacher's vocabulary)."""
    t_vocab, s_vocab = int(teacher.config.vocab_size), int(student.config.vocab_size)
    if not any((student_dir / f).is_file() for f in TOKENIZER_FILES):
        if t_vocab != s_vocab:
            raise TrainerError(
                ExitCode.BAD_SPEC,
                f"the student's vocabulary ({s_vocab} ids) differs from the teacher's ({t_vocab}) and "
                f"{student_dir} holds no tokenizer: save the student's own tokenizer with it",
            )
        return None
    s_tok = load_tokenizer(student_dir, trust_remote_code=False)
    if s_tok.get_vocab() != teacher_tok.get_vocab():
        return s_tok
    if t_vocab != s_vocab:
        raise TrainerError(
            ExitCode.BAD_SPEC,
            f"the student uses the teacher's tokenizer but its vocabulary has {s_vocab} ids against the "
            f"teacher's {t_vocab}; logits KD needs equal output widths",
        )
    return None


def cross_tokenizer_problems(spec: DistillationJobSpec) -> list[str]:
    """Why this job cannot train a student whose tokenizer differs from the teacher's (empty: it
    can). ``sequence`` and ``on-policy`` pass text between the models; ``logits`` needs
    ``distillation.crossTokenizer``; hidden and attention transfer compare positions one for one."""
    stages = spec.distillation.stages
    objectives = {o for s in stages for o in s.objectives}
    if spec.quantization.mode == "qat-int8":
        objectives.add("logits")  # the QAT phase trains with the logits objective
    problems: list[str] = []
    if spec.task != "causal-lm":
        problems.append(f"task {spec.task} needs the teacher's tokenizer")
    features = [
        f"distillation.stages[{i}] ({s.name}) uses {o}"
        for i, s in enumerate(stages)
        for o in s.objectives
        if o in ("hidden", "attention")
    ]
    if features:
        problems.append(
            "hidden and attention transfer compare the models position by position, which needs one "
            "tokenizer: " + "; ".join(features)
        )
    if "logits" in objectives:
        if spec.distillation.cross_tokenizer is None:
            where = "the logits objective" + (
                " (quantization.mode qat-int8 trains its QAT phase with logits)"
                if spec.quantization.mode == "qat-int8"
                else ""
            )
            problems.append(
                f"{where} needs distillation.crossTokenizer.method (uld or byte-span); or distil with "
                "the sequence or on-policy objectives, which pass text between the models"
            )
        par = spec.parallelism
        if par.student.tensor > 1 or par.student.pipeline > 1:
            problems.append("logits with crossTokenizer runs on a whole student: parallelism.student.tensor/pipeline 1")
        if par.teacher_pipeline_stages > 1:
            problems.append("logits with crossTokenizer runs the whole teacher: parallelism.teacherPipelineStages 1")
        if spec.distillation.teacher_cache.enabled:
            problems.append(
                "logits with crossTokenizer reads the live teacher: distillation.teacherCache.enabled false"
            )
        if spec.teacher.remote:
            problems.append(
                "logits with crossTokenizer runs the teacher in the training process: teacher.model without "
                "teacher.endpoint or teacher.serve"
            )
    return problems


def check_cross_tokenizer(spec: DistillationJobSpec, student_dir: Path) -> None:
    problems = cross_tokenizer_problems(spec)
    if problems:
        raise TrainerError(
            ExitCode.BAD_SPEC,
            f"the student's tokenizer at {student_dir} maps text to ids differently from the teacher's: "
            + "; ".join(problems),
        )


def check_same_labels(teacher: nn.Module, student: nn.Module) -> None:
    t_labels, s_labels = int(teacher.config.num_labels), int(student.config.num_labels)
    if t_labels != s_labels:
        raise TrainerError(ExitCode.BAD_SPEC, f"the student has {s_labels} labels but the teacher has {t_labels}")


def _student_on_meta(student_dir: Path, task: str) -> tuple[nn.Module, Any]:
    """The student of ``student_dir`` on the meta device, and the source of its weights."""
    from transformers import AutoConfig

    from .parallel.meta_load import WeightSource, build_on_meta

    try:
        config = AutoConfig.from_pretrained(str(student_dir), trust_remote_code=False)
        student = build_on_meta(config, task)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"student at {student_dir} cannot be loaded: {exc}") from None
    return student, WeightSource.of(student_dir, prefix=student.base_model_prefix)


def _copied_on_meta(cfg: Any, teacher_dir: Path, task: str, copied: list[int], trust: bool) -> tuple[nn.Module, Any]:
    """A ``fromTeacher`` student that copies teacher layers, on the meta device: its block ``i``
    is read from the teacher's block ``copied[i]`` in the teacher's safetensors."""
    from .parallel.meta_load import WeightSource, build_on_meta

    student = build_on_meta(cfg, task, trust)
    return student, WeightSource.of(teacher_dir, layer_map=copied, prefix=student.base_model_prefix)


def load_models(
    spec: DistillationJobSpec,
    base_dir: Path,
    seed: int | None = None,
    *,
    remote: bool = False,
    meta_student: bool = False,
) -> Models:
    """Teacher (eval mode, frozen, in ``teacher.dtype``), tokenizer, and the student in float32;
    with ``remote`` (a served teacher) no teacher weights stay loaded (``load_for_served_teacher``);
    with ``meta_student`` a student read from disk stays on the meta device (module docstring)."""
    if remote:
        return load_for_served_teacher(spec, base_dir, seed, meta_student=meta_student)
    task = spec.task
    assert spec.teacher.model is not None  # the API requires it unless the teacher is served
    trust = spec.teacher.trust_remote_code
    teacher_dir = _existing_dir(spec.teacher.model, base_dir, "teacher")
    tokenizer = load_tokenizer(teacher_dir, trust)
    teacher = _load_pretrained(teacher_dir, task, DTYPES[spec.teacher.dtype], trust, "teacher")
    teacher.eval()
    teacher.requires_grad_(False)
    copied: list[int] = []
    student_tok = None
    source = None
    if spec.student.model is not None:
        student_dir = _existing_dir(spec.student.model, base_dir, "student")
        # Student code is never trusted: trustRemoteCode speaks for the teacher only.
        if meta_student:
            student, source = _student_on_meta(student_dir, task)
        else:
            student = _load_pretrained(student_dir, task, torch.float32, False, "student")
        student_tok = student_tokenizer_if_different(teacher, tokenizer, student, student_dir)
        if student_tok is not None:
            check_cross_tokenizer(spec, student_dir)
    else:
        assert spec.student.from_teacher is not None
        cfg, copied = derive_student_config(teacher.config, spec.student.from_teacher)
        torch.manual_seed(spec.distillation.seed if seed is None else seed)
        if meta_student and copied:
            student, source = _copied_on_meta(cfg, teacher_dir, task, copied, trust)
            log.info("student: %d layers to read from teacher layers %s, each rank its slices", len(copied), copied)
        else:
            # Whole: an unsplit student, or a fresh one (another width), whose initial weights are
            # drawn from the RNG over the whole model in one order; a rank cannot draw its slices
            # alone and get the same values, so a split run builds it as one process does and
            # cuts it afterwards.
            student = auto_model_class(task).from_config(cfg, dtype=torch.float32, trust_remote_code=trust)
        if copied and source is None:
            copy_teacher_layers(student, teacher, copied)
            log.info("student: %d layers copied from teacher layers %s", len(copied), copied)
        elif not copied:
            log.info(
                "student: fresh %s (width %s, %s layers)",
                type(student).__name__,
                cfg.hidden_size,
                cfg.num_hidden_layers,
            )
    if task == "sequence-classification":
        check_same_labels(teacher, student)
    return Models(
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        teacher_dir=teacher_dir,
        copied_layers=copied,
        student_tokenizer=student_tok,
        student_source=source,
    )


def load_for_served_teacher(
    spec: DistillationJobSpec, base_dir: Path, seed: int | None = None, *, meta_student: bool = False
) -> Models:
    """The student and the tokenizer when the teacher is served: the teacher's weights are read
    only to copy layers into a ``student.fromTeacher`` student, and dropped afterwards. The
    tokenizer is teacher.model's when it is given, else the student's (checked against the
    served teacher's tokens at start, remote_targets.check_served_tokens)."""
    task = spec.task
    trust = spec.teacher.trust_remote_code
    teacher_dir = _existing_dir(spec.teacher.model, base_dir, "teacher") if spec.teacher.model else None
    copied: list[int] = []
    student_tok = None
    source = None
    if spec.student.model is not None:
        student_dir = _existing_dir(spec.student.model, base_dir, "student")
        if meta_student:
            student, source = _student_on_meta(student_dir, task)
        else:
            student = _load_pretrained(student_dir, task, torch.float32, False, "student")
        if teacher_dir is None:
            return Models(None, student, load_tokenizer(student_dir, False), None, student_source=source)
        tokenizer = load_tokenizer(teacher_dir, trust)
        from types import SimpleNamespace

        # Only the teacher's config is compared (its vocabulary): no weights.
        config_only = SimpleNamespace(config=_teacher_config(teacher_dir, trust))
        student_tok = student_tokenizer_if_different(config_only, tokenizer, student, student_dir)
        if student_tok is not None:
            check_cross_tokenizer(spec, student_dir)
        return Models(None, student, tokenizer, teacher_dir, student_tokenizer=student_tok, student_source=source)
    assert spec.student.from_teacher is not None and teacher_dir is not None  # the API's rule
    tokenizer = load_tokenizer(teacher_dir, trust)
    cfg, copied = derive_student_config(_teacher_config(teacher_dir, trust), spec.student.from_teacher)
    torch.manual_seed(spec.distillation.seed if seed is None else seed)
    if meta_student and copied:
        # No teacher weights are loaded at all: each rank reads its slices of the teacher's files.
        student, source = _copied_on_meta(cfg, teacher_dir, task, copied, trust)
        return Models(None, student, tokenizer, teacher_dir, copied_layers=copied, student_source=source)
    # A fresh student is drawn whole from the RNG (see load_models).
    student = auto_model_class(task).from_config(cfg, dtype=torch.float32, trust_remote_code=trust)
    if copied:
        teacher = _load_pretrained(teacher_dir, task, torch.float32, trust, "teacher")
        copy_teacher_layers(student, teacher, copied)
        del teacher
        log.info("student: %d layers copied from teacher layers %s (teacher weights dropped)", len(copied), copied)
    return Models(None, student, tokenizer, teacher_dir, copied_layers=copied)


def _teacher_config(teacher_dir: Path, trust: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(teacher_dir), trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"teacher config at {teacher_dir} cannot be read: {exc}") from None
