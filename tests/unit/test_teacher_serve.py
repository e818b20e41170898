"""The served teacher's `kdistill serve` options: what the trainer will ask must fit the limits,
and both launchers (the operator's Deployment, kdistill run's local server) use the same ones."""

from __future__ import annotations

from pathlib import Path

from kdistill.api import parse_job
from kdistill.api.teacher_serve import teacher_serve_options
from kdistill.cli.served_teacher import serve_command
from tests.spec_table import with_spec


def _options(**changes: object) -> dict[str, str]:
    spec = parse_job(with_spec(**{"teacher.serve": {"enabled": True}}, **changes)).spec
    opts = teacher_serve_options(spec)
    return dict(zip(opts[::2], opts[1::2], strict=True))


def test_defaults_keep_the_servers_own_limits() -> None:
    assert _options() == {
        "--max-batch-size": "64",
        "--max-batch-tokens": "16384",
        "--max-wait-ms": "10",
        "--max-logprobs-binary": "128",
        "--max-tokens-limit": "512",
    }


def test_limits_grow_with_what_the_trainer_asks() -> None:
    opts = _options(
        **{
            "distillation.onPolicy": {"topK": 300, "maxNewTokens": 700},
            "distillation.generation": {"maxNewTokens": 2048},
            "distillation.teacherCache": {"topK": 200},
        }
    )
    assert opts["--max-logprobs-binary"] == "300"
    assert opts["--max-tokens-limit"] == "2048"


def test_trust_remote_code_only_when_asked() -> None:
    spec = parse_job(with_spec(**{"teacher.serve": {"enabled": True}, "teacher.trustRemoteCode": True})).spec
    assert teacher_serve_options(spec)[-1] == "--trust-remote-code"
    assert "--trust-remote-code" not in teacher_serve_options(parse_job(with_spec()).spec)


def test_the_local_launcher_uses_the_same_options() -> None:
    spec = parse_job(with_spec(**{"teacher.serve": {"enabled": True}, "distillation.onPolicy": {"topK": 256}})).spec
    command = serve_command(spec, Path("/models/t"), 12345)
    opts = teacher_serve_options(spec)
    start = command.index(opts[0])
    assert command[start : start + len(opts)] == opts
