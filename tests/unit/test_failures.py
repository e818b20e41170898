from __future__ import annotations

from kdistill.api.failures import ExitCode, Termination, parse_termination, termination_for


def test_message_wins_over_exit_code() -> None:
    t = termination_for(ExitCode.BAD_DATA, "train.jsonl: 40% of lines bad")
    parsed = parse_termination(t.to_json(), 1)
    assert (parsed.reason, parsed.retryable) == ("BAD_DATA", False)
    assert "40%" in parsed.message


def test_exit_code_classifies_without_message() -> None:
    assert parse_termination(None, ExitCode.PEER_LOST).retryable is True
    assert parse_termination("", ExitCode.BAD_SPEC).retryable is False
    assert parse_termination(None, 137).retryable is True


def test_success_carries_result() -> None:
    t = Termination("Succeeded", False, result={"retention": 0.97})
    parsed = parse_termination(t.to_json(), 0)
    assert parsed.result == {"retention": 0.97}


def test_long_message_fits_kubelet_limit() -> None:
    assert len(termination_for(ExitCode.INTERNAL, "x" * 10000).to_json()) <= 4000
