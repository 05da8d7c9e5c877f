"""The launcher's pieces that need no process: one checkpoint policy from the command line to
the coordinator's command line and back, and the loose keywords that still give one."""

from __future__ import annotations

import pytest

from paramserver.cli import _checkpoints, _parser
from paramserver.config import CheckpointPolicy, Timeouts
from paramserver.errors import ConfigError
from paramserver.launch.children import describe_exit, exit_code
from paramserver.launch.roles import checkpoint_flags, checkpoint_policy, timeout_flags


def coordinator_args(*flags: str) -> CheckpointPolicy | None:
    return _checkpoints(_parser().parse_args(["coordinator", "-s", "1", "-w", "1", *flags]))


@pytest.mark.parametrize(
    "policy",
    [
        CheckpointPolicy("/ckpt"),
        CheckpointPolicy("/ckpt", every_seconds=0.25, keep=7, timeout=12.5),
        CheckpointPolicy("/c k/pt", every_clocks=5, keep=1),
    ],
)
def test_a_policy_survives_the_coordinators_command_line(policy: CheckpointPolicy) -> None:
    assert coordinator_args(*checkpoint_flags(policy)) == policy


def test_the_flags_give_one_policy_or_none_without_a_directory() -> None:
    assert coordinator_args() is None
    assert coordinator_args("--checkpoint-every", "5") is None  # as before: no directory, none
    assert coordinator_args("--checkpoint-dir", "d", "--checkpoint-every-clocks", "3") == (
        CheckpointPolicy("d", every_clocks=3)
    )
    with pytest.raises(ConfigError, match="at least 1"):
        coordinator_args("--checkpoint-dir", "d", "--checkpoint-keep", "0")
    with pytest.raises(ConfigError, match="timeout must be positive"):
        coordinator_args("--checkpoint-dir", "d", "--checkpoint-timeout", "0")


def test_the_loose_keywords_give_the_same_policy_and_never_mix_with_one() -> None:
    given = checkpoint_policy(None, "d", 2, 4, None)
    assert given == CheckpointPolicy("d", every_seconds=2.0, keep=4)
    assert checkpoint_policy(given, None, None, None, None) is given
    assert checkpoint_policy(None, None, 5.0, 3, 2) is None
    with pytest.raises(ConfigError, match="not both"):
        checkpoint_policy(given, "d", None, None, None)


def test_timeouts_survive_a_roles_command_line() -> None:
    t = Timeouts(heartbeat_interval=0.1, heartbeat_timeout=0.7, request=3.5, connect=9.0)
    args = _parser().parse_args(["server", *timeout_flags(t)])
    got = (
        args.heartbeat_interval,
        args.heartbeat_timeout,
        args.request_timeout,
        args.connect_timeout,
    )
    assert got == (0.1, 0.7, 3.5, 9.0)


def test_exit_codes_read_as_a_shell_reads_them() -> None:
    assert (exit_code(0), exit_code(3), exit_code(-9)) == (0, 3, 137)
    assert (describe_exit(2), describe_exit(-15)) == ("exit code 2", "signal SIGTERM")
    assert describe_exit(-200) == "signal 200"
