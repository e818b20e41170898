"""The trainer image: one image for `train` and `serve`, non-root, read-only root filesystem.
It trains a tiny distillation job from a local config, then serves the INT8 student over HTTP."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest

from tests.trainer import helpers

from .docker import HARDENED, Docker, wait_http, world_readable


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT2 teacher, pydoc data and a job file, as the container will see them under /job."""
    root = tmp_path_factory.mktemp("trainer-image-job")
    tok = helpers.make_tokenizer(root / "tokenizer", [p for _, p in helpers.pydoc_paragraphs(300)])
    helpers.save_model(helpers.gpt2(len(tok), layers=4, width=32), tok, root / "teacher")
    helpers.causal_data(root / "data", n_train=64, n_eval=16)
    job = helpers.job_dict("image-tiny", "causal-lm", "teacher", "data/train.jsonl", "data/eval.jsonl",
                           quantization="ptq-int8", every_steps=3)  # fmt: skip
    job["spec"]["serving"]["qualityGate"] = {"minRetention": 0.01}
    helpers.write_job(root / "job.yaml", job)
    world_readable(root)
    return root


def test_trainer_image_is_non_root_with_train_and_serve_entrypoints(docker: Docker, trainer_image: str) -> None:
    info = json.loads(docker("image", "inspect", trainer_image).stdout)[0]
    assert info["Config"]["User"] == "65532:65532"
    assert info["Config"]["Entrypoint"] == ["kdistill-entrypoint"]
    for command in ("train", "serve"):
        out = docker("run", "--rm", *HARDENED, trainer_image, command, "--help").stdout
        assert "Usage" in out and command in out
    torchrun = docker("run", "--rm", *HARDENED, trainer_image, "torchrun", "--help").stdout
    assert "--nproc-per-node" in torchrun or "--nproc_per_node" in torchrun


def test_trainer_image_trains_a_tiny_job_then_serves_the_int8_student(
    docker: Docker, trainer_image: str, job_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    train = docker("run", "--rm", "--network", "none", *HARDENED, "-e", "OMP_NUM_THREADS=1",
                   "-v", f"{job_dir}:/job:ro", "-v", f"{out}:/out", trainer_image,
                   "train", "--config", "/job/job.yaml", "--output", "/out/image-tiny", timeout=900)  # fmt: skip
    result = json.loads((out / "image-tiny" / "result.json").read_text())
    artifact = out / "image-tiny" / "student-int8"
    meta = json.loads((artifact / "kdistill.json").read_text())
    assert meta["quantization"] != "none", meta
    assert result, train.stderr[-2000:]

    port = _free_port()
    name = f"kdistill-serve-test-{uuid.uuid4().hex[:6]}"
    docker("run", "-d", "--name", name, "--network", "host", *HARDENED, "-e", "OMP_NUM_THREADS=1",
           "-v", f"{artifact}:/model:ro", trainer_image, "serve", "/model", "--host", "127.0.0.1",
           "--port", str(port))  # fmt: skip
    try:

        def alive() -> bool:
            return docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"

        try:
            # Loading torch and the model: seconds on an idle machine, minutes on a loaded 2-core one.
            wait_http(f"http://127.0.0.1:{port}/v2/health/ready", 400, alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nserver log:\n{docker.logs(name)[-4000:]}") from None
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"prompt": "The for statement", "max_tokens": 4}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        assert resp.status == 200
        assert isinstance(body["choices"][0]["text"], str)
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        docker.remove(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
