"""train-heads under a launcher reads WORLD_SIZE, LOCAL_RANK, MEDUSA_DIST_TIMEOUT_S and torch's RANK /
MASTER_ADDR / MASTER_PORT from the environment: an odd or missing one is an InputError naming it, not a traceback."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from medusa_export.exporter.training.distributed import setup_distributed  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
    ({"WORLD_SIZE": ""}, "WORLD_SIZE='' is not an integer"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2", "MEDUSA_DIST_TIMEOUT_S": "abc"}, "MEDUSA_DIST_TIMEOUT_S='abc' is not a number"),
    ({"WORLD_SIZE": "2", "MEDUSA_DIST_TIMEOUT_S": "1e300"}, "MEDUSA_DIST_TIMEOUT_S=1e\\+300: give seconds"),
    ({"WORLD_SIZE": "2", "MEDUSA_DIST_TIMEOUT_S": "nan"}, "MEDUSA_DIST_TIMEOUT_S=nan: give seconds"),
    ({"WORLD_SIZE": "2"}, "the distributed run cannot start .*RANK.*torchrun"),  # RANK unset
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     "MASTER_PORT='abc' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000: it must be a port, 1-65535"),
    ({"WORLD_SIZE": "2", "RANK": "one"}, "RANK='one' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1: it must be 0 or more"),
])
def test_odd_launcher_variables_are_input_errors(monkeypatch, env, needle):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT", "MEDUSA_DIST_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=needle):
        setup_distributed("cpu")


def test_no_launcher_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MEDUSA_DIST_TIMEOUT_S", "abc")  # read only when a group starts
    assert setup_distributed("cpu")[:2] == (0, 1)
