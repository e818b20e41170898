"""The served artifact: a self-describing directory that loads without executing pickled code.

Layout::

    config.json              the model's transformers config (no remote code is ever run)
    tokenizer.json, ...      the tokenizer, as ``save_pretrained`` writes it
    model.safetensors        weights; for INT8: ``Int8Linear`` buffers (int8 weights, fp32 scales)
    kdistill.json            task, quantization, kdistill version, metrics, sha256 of every file

``sha256_file`` is the one file checksum the trainer and the server use (the server reaches the
trainer only through this module).

Weights are safetensors only: plain tensors, no pickle, so nothing in the directory can run code
when loaded. INT8 layers are stored backend-neutral (int8 + per-channel scale), and the loading
machine picks its own kernel (``quantization.select_int8_kernel``). ``load_artifact`` verifies every
checksum before reading anything, and refuses a directory whose files do not match.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kdistill

from . import quantization as q
from .fsio import replace_dir, sha256_file

__all__ = [
    "META_FILE",
    "WEIGHTS_FILE",
    "Artifact",
    "ArtifactError",
    "load_artifact",
    "read_meta",
    "save_artifact",
    "sha256_file",
]

META_FILE = "kdistill.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "kdistill-artifact/v1"
TASKS = ("causal-lm", "sequence-classification")
QUANTIZATIONS = ("none", "ptq-int8", "qat-int8")


class ArtifactError(ValueError):
    """The directory is not a usable artifact (missing file, bad metadata, checksum mismatch)."""


@dataclass
class Artifact:
    model: nn.Module
    tokenizer: Any
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.meta["task"])


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != META_FILE
    }


def _model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def save_artifact(
    model: nn.Module, tokenizer: Any, out_dir: Path, *, task: str, quantization: str, metrics: dict[str, Any]
) -> Path:
    """Write the artifact atomically (a temporary sibling directory renamed into place)."""
    from safetensors.torch import save_model

    if task not in TASKS:
        raise ArtifactError(f"task: expected one of {TASKS}, got {task!r}")
    if quantization not in QUANTIZATIONS:
        raise ArtifactError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
    int8_layers = q.int8_modules(model)
    if (quantization != "none") != bool(int8_layers):
        raise ArtifactError(f"quantization {quantization!r} but the model has {len(int8_layers)} INT8 layers")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    # save_model drops the duplicate names of tied tensors (lm_head = embeddings) and stores them once.
    save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "task": task,
        "kdistill_version": kdistill.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": type(model).__name__,
        "quantization": {
            "mode": quantization,
            "weights": q.INT8_WEIGHT_SCHEME if int8_layers else "float32",
            "activations": "dynamic int8 (kernel chosen at load time)" if int8_layers else "float32",
            "int8_modules": int8_layers,
            "full_precision": "embeddings, norms and heads (lm_head / classifier) stay float32",
        },
        "metrics": metrics,
        "files": _hash_tree(tmp),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    replace_dir(tmp, out_dir)
    return out_dir


def read_meta(model_dir: Path) -> dict[str, Any]:
    """The checked metadata of ``model_dir``: every listed file present with its sha256."""
    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{model_dir} is not a kdistill artifact: no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{meta_path}: unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path}: format must be {FORMAT!r}")
    if meta.get("task") not in TASKS:
        raise ArtifactError(f"{meta_path}: task must be one of {TASKS}, got {meta.get('task')!r}")
    files = meta.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files or "config.json" not in files:
        raise ArtifactError(f"{meta_path}: files must list {WEIGHTS_FILE} and config.json with their sha256")
    for rel, expected in files.items():
        path = (model_dir / rel).resolve()
        if model_dir.resolve() not in path.parents:
            raise ArtifactError(f"{meta_path}: file {rel!r} lies outside the artifact")
        if not path.is_file():
            raise ArtifactError(f"{model_dir}: {rel} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{model_dir}: checksum mismatch for {rel} (expected {expected[:12]}…, got "
                f"{actual[:12]}…): refusing to load a modified artifact"
            )
    return meta


def load_config_and_tokenizer(model_dir: Path, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A model directory's config and tokenizer, with the EOS token as padding where none is set."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{model_dir}: config or tokenizer cannot be loaded: {exc}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, tokenizer


def load_artifact(model_dir: Path, *, kernel: q.Int8Kernel | None = None) -> Artifact:
    """Load a verified artifact: config → empty model → INT8 layers in place → safetensors weights."""
    from safetensors.torch import load_model

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    config, tokenizer = load_config_and_tokenizer(model_dir)
    model = _model_class(meta["task"]).from_config(config)
    quant = meta.get("quantization", {})
    layers = list(quant.get("int8_modules", []))
    if layers:
        kernel = kernel or q.select_int8_kernel()
        q.conv1d_to_linear(model)
        for name in layers:
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ArtifactError(
                    f"{model_dir}: INT8 module {name!r} does not exist in {type(model).__name__}"
                ) from None
            if not isinstance(old, nn.Linear):
                raise ArtifactError(f"{model_dir}: INT8 module {name!r} is a {type(old).__name__}, not a Linear")
            q._set_module(model, name, q.Int8Linear(old.in_features, old.out_features, old.bias is not None, kernel))
    try:
        missing, unexpected = load_model(model, str(model_dir / WEIGHTS_FILE), strict=False)
    except (RuntimeError, OSError) as exc:
        raise ArtifactError(f"{model_dir}: weights do not fit the config: {exc}") from None
    if missing or unexpected:
        raise ArtifactError(
            f"{model_dir}: weights do not fit the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    return Artifact(model=model, tokenizer=tokenizer, meta=meta)
