"""`ftmem-chaos` against a bare SMP: what it cannot do is said in one line with exit code 1, and nothing is killed
but what was named. (Killing ranks, SMPs and whole nodes of real jobs: tests/test_recovery.py and
tests/test_multinode.py drive their faults through it.)"""

from __future__ import annotations

import json
import os
import signal

import pytest

from ftmem.chaos.cli import main


@pytest.fixture
def smp(cluster, monkeypatch):
    monkeypatch.setenv("FTMEM_RUNTIME_DIR", str(cluster.runtime))
    return cluster.start_smp()


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_nothing_running_is_said(cluster, monkeypatch, capsys):
    monkeypatch.setenv("FTMEM_RUNTIME_DIR", str(cluster.runtime))
    code, out = run(capsys, "kill-rank", "--rank", "0")
    assert code == 1 and "no SMP of any job runs on this machine (jobs here: none" in out, out
    code, out = run(capsys, "kill-smp", "--job-id", "nosuchjob", "--after-step", "1", "--timeout", "0.3")
    assert code == 1 and "no SMP of job 'nosuchjob' runs on this machine" in out, out


def test_refusals_kill_nothing(cluster, smp, capsys):
    code, out = run(capsys, "kill-smp", "--job-id", cluster.job, "--after-step", "3", "--timeout", "1")
    assert code == 1 and f"job '{cluster.job}' did not commit step 3 within 1s (newest committed: None)" in out
    code, out = run(capsys, "kill-rank", "--rank", "5")  # the only job here: no --job-id needed
    assert code == 1 and f"no live process of job '{cluster.job}' on this machine runs rank 5" in out, out
    code, out = run(capsys, "kill-node", "--node", "1")
    assert code == 1 and f"node 1 of job '{cluster.job}' has no running SMP on this machine (nodes here: [0])" in out
    code, out = run(capsys, "kill-node", "--node", "0")  # a bare SMP: no ftmem-run to kill with it
    assert code == 1 and "node 0's SMP was not started by a running ftmem-run" in out, out
    assert smp.poll() is None, "a refused command killed the SMP"


def test_a_stale_info_file_whose_pid_was_reused_is_ignored(cluster, monkeypatch, capsys):
    """An SMP killed with SIGKILL leaves its info file; by the time someone runs ftmem-chaos its pid may belong
    to any process of the user. That process is never signalled."""
    monkeypatch.setenv("FTMEM_RUNTIME_DIR", str(cluster.runtime))
    bystander = cluster.start(["sleep", "60"], name="bystander")
    (cluster.runtime / "stale.n0.json").write_text(json.dumps(
        {"pid": bystander.pid, "job": "stale", "node": 0, "control": "ipc:///nonexistent", "parent_pid": os.getpid()}))
    for argv, says in ((["kill-smp"], "job 'stale' has no running SMP on this machine (nodes here: [])"),
                       (["kill-node", "--node", "0"], "node 0 of job 'stale' has no running SMP"),
                       (["kill-rank", "--rank", "0", "--after-step", "1", "--timeout", "0.5"],
                        "job 'stale' has no running SMP")):
        code, out = run(capsys, *argv, "--job-id", "stale")
        assert code == 1 and says in out, out
    assert bystander.poll() is None, "ftmem-chaos signalled a process named by a stale info file"


def test_kill_smp_sends_the_signal_asked(cluster, smp, capsys):
    code, out = run(capsys, "kill-smp", "--signal", "KILL")
    assert code == 0 and f"sent SIGKILL to the SMP of job {cluster.job} node 0 (pid {smp.pid})" in out, out
    assert smp.wait(timeout=10) == -signal.SIGKILL
