"""What ``kdistill serve DIR`` loads: a kdistill artifact (``kdistill.json``, verified checksums,
INT8 layers) or a plain Hugging Face model directory (``config.json``, tokenizer files, safetensors
weights), so that any teacher is served as it is.

A plain directory is loaded with safetensors only (never a pickled ``pytorch_model.bin``) and
without remote code unless the caller asks for it. Its task comes from the config's architecture:
``...ForSequenceClassification`` is a classifier, anything else a causal LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdistill.trainer.artifact import META_FILE, Artifact, ArtifactError, load_artifact, load_config_and_tokenizer

HF_CONFIG = "config.json"


def kind_of(model_dir: Path) -> str | None:
    """``"artifact"``, ``"huggingface"``, or None when the directory is neither."""
    if (model_dir / META_FILE).is_file():
        return "artifact"
    if (model_dir / HF_CONFIG).is_file():
        return "huggingface"
    return None


def hf_task(config: Any) -> str:
    architectures = [str(a) for a in (getattr(config, "architectures", None) or [])]
    return (
        "sequence-classification"
        if any(a.endswith("ForSequenceClassification") for a in architectures)
        else "causal-lm"
    )


def load_hf_dir(model_dir: Path, *, trust_remote_code: bool = False) -> Artifact:
    """A plain Hugging Face directory as an ``Artifact`` (FP32 as saved, no quantization)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if not any(model_dir.glob("*.safetensors")):
        raise ArtifactError(f"{model_dir}: no *.safetensors weights (pickled weights are not loaded)")
    config, tokenizer = load_config_and_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    task = hf_task(config)
    cls = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(
            str(model_dir), config=config, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{model_dir}: weights cannot be loaded: {exc}") from None
    model.eval()
    meta = {"task": task, "quantization": {"mode": "none"}, "source": "huggingface"}
    return Artifact(model=model, tokenizer=tokenizer, meta=meta)


def load_model_dir(model_dir: Path, *, trust_remote_code: bool = False) -> Artifact:
    """The served model of ``model_dir``, whichever of the two layouts it has."""
    kind = kind_of(model_dir)
    if kind == "artifact":
        return load_artifact(model_dir)
    if kind == "huggingface":
        return load_hf_dir(model_dir, trust_remote_code=trust_remote_code)
    raise ArtifactError(f"{model_dir} has neither {META_FILE} (kdistill artifact) nor {HF_CONFIG} (Hugging Face model)")
