"""End to end golden-run comparisons with examples/train_gpt.py: whatever dies (a rank, at any phase of the
snapshot protocol, the SMP, everything but the launcher, the launcher itself), the job resumes from memory and
ends with the same final hash as a run without failures; a corrupt snapshot is never silently loaded."""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import EXAMPLE, Cluster, final_hash
from ftmem.smp.layout import HEADER_SIZE, BufferState, Descriptor, Header, LayoutError
from ftmem.smp.shm import Segment

STEPS = ["--steps", "24"]
TWO = ["--nproc-per-node", "2"]
SLOW = ["--step-sleep", "0.05"]  # so a kill from outside lands mid-run


@pytest.fixture(scope="module")
def golden2(module_cluster):
    """Final hash of the 2-rank job without the hook (computed once per module)."""
    c = module_cluster
    run = c.start([sys.executable, "-m", "torch.distributed.run", "--standalone", *TWO, str(EXAMPLE), *STEPS,
                   "--no-ftmem"], name="golden2")
    return final_hash(c.wait(run, timeout=120))


@pytest.fixture(scope="module")
def golden1(module_cluster):
    """Final hash of the single-process job without the hook."""
    c = module_cluster
    return final_hash(c.wait(c.python([str(EXAMPLE), *STEPS, "--no-ftmem"], name="golden1"), timeout=120))


def restored_steps(output: str) -> list[int]:
    return [int(s) for s in re.findall(r"restored step (\d+) from local memory", output)]


def wait_ok(cluster: Cluster, proc, timeout: float = 120) -> str:
    out = cluster.wait(proc, timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{cluster.logs()}"
    return out


def job_processes(cluster: Cluster) -> list[psutil.Process]:
    """Live processes whose command line names this test's job (self-started SMPs run detached)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.info["cmdline"] and cluster.job in " ".join(p.info["cmdline"]):
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def chaos(cluster: Cluster, *args: str) -> str:
    """Run `ftmem-chaos ARGS` on the cluster's job; its output (it must succeed)."""
    proc = cluster.python(["-m", "ftmem.chaos.cli", *args, "--job-id", cluster.job], name=f"chaos-{args[0]}")
    out = cluster.wait(proc, timeout=120)
    assert proc.returncode == 0, f"ftmem-chaos {' '.join(args)} failed: {out}\n{cluster.logs()}"
    return out


def test_hook_changes_no_result(cluster, golden2):
    out = wait_ok(cluster, cluster.ftmem_run(TWO, STEPS))
    assert final_hash(out) == golden2
    assert "no snapshot to restore, starting at step 0" in out and "resumed-at-step" not in out
    assert restored_steps(out) == []
    assert cluster.segments() == [], "a successful ftmem-run leaves no segments behind"
    assert "segments removed" in cluster.smp_log()


def test_rank_sigkilled_at_a_random_step(cluster, golden2):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    step = rng.randint(2, 14)
    print(f"seed {seed}: SIGKILL rank 1 once the job committed step {step}")
    run = cluster.ftmem_run([*TWO, "--max-restarts", "2"], [*STEPS, *SLOW])
    chaos_out = chaos(cluster, "kill-rank", "--rank", "1", "--after-step", str(step))
    assert re.search(r"sent SIGKILL to rank 1 of job \S+ \(pid \d+, node 0\)", chaos_out), chaos_out
    out = wait_ok(cluster, run)
    assert final_hash(out) == golden2, f"seed {seed}"
    restored = restored_steps(out)
    assert restored, f"no 'restored step' line (seed {seed})\n{cluster.logs()}"
    # a snapshot every step: at most the steps in flight are lost
    assert step - 2 <= restored[0] <= 23, f"restored {restored} after a kill at step {step} (seed {seed})"
    assert f"resumed-at-step {restored[0] + 1}" in out


def test_a_rank_crashing_at_each_phase_of_a_snapshot_is_recovered_bit_identically(cluster, golden2):
    """Rank 1 dies at each phase of the snapshot protocol in turn, in one run: mid-copy at step 6, before its
    local commit at step 12, right after it at step 18. Each time the workers restart and restore the newest step
    every rank holds: the one before (rank 1 never completed the step), except after a local commit, when rank 0
    may have completed that step too."""
    points = {"mid_copy": 6, "before_local_commit": 12, "after_local_commit": 18}
    run = cluster.ftmem_run([*TWO, "--max-restarts", "3"], STEPS,
                            FTMEM_CRASH_AT=",".join(f"{point}@{step}@1" for point, step in points.items()),
                            FTMEM_CRASH_MARKER=str(cluster.tmp / "crash"))
    out = wait_ok(cluster, run)
    for point, step in points.items():
        assert (cluster.tmp / f"crash.{point}.{step}").exists(), f"{point} never fired\n{cluster.logs()}"
    assert final_hash(out) == golden2
    restored = sorted(set(restored_steps(out)))
    assert len(restored) == 3 and restored[:2] == [5, 11] and restored[2] in (17, 18), restored


def test_a_hung_rank_is_killed_and_the_job_resumes_from_memory(cluster, golden2):
    """DESIGN.md §1, a hang of a rank: heartbeat timeout → kill → restore. Rank 1 is stopped (SIGSTOP, as a stuck
    process would be) once the job committed step 3, within a second of the first snapshot. Nothing crashes:
    rank 0 blocks in its next all-reduce. With --ftmem-hang-timeout, ftmem-run takes the node's workers for hung
    when no snapshot completes for that long, kills them, and the agent restarts them from memory."""
    run = cluster.ftmem_run([*TWO, "--max-restarts", "2", "--ftmem-hang-timeout", "5"], [*STEPS, *SLOW])
    chaos(cluster, "kill-rank", "--rank", "1", "--signal", "STOP", "--after-step", "3")
    stopped = time.monotonic()
    cluster.wait_for_line(run, "they look hung", timeout=60)
    print(f"workers taken for hung {time.monotonic() - stopped:.1f}s after rank 1 was stopped")
    out = wait_ok(cluster, run)
    assert out.count("they look hung") == 1, cluster.logs()
    assert final_hash(out) == golden2
    restored = restored_steps(out)
    assert restored and 3 <= restored[0] <= 5, f"restored {restored} after a hang at step 3\n{cluster.logs()}"


def test_smp_killed_mid_run_is_restarted_and_readopts(cluster, golden2):
    """The SMP dies twice in one run: at the crash point right after it recorded the first local commit of
    step 5, then by SIGKILL from outside at a random later step. Each time the launcher restarts it, the new
    SMP re-adopts the segments, and the job ends with the golden hash."""
    seed = random.randrange(2**32)
    step = random.Random(seed).randint(10, 16)
    print(f"seed {seed}: crash point smp_after_local_commit@5, then SIGKILL the SMP after step {step}")
    run = cluster.ftmem_run([*TWO, "--max-restarts", "3"], [*STEPS, *SLOW],
                            FTMEM_CRASH_AT="smp_after_local_commit@5", FTMEM_CRASH_MARKER=str(cluster.tmp / "crash"))
    cluster.wait_for_line(run, f"step {step} loss")
    assert (cluster.tmp / "crash.smp_after_local_commit.5").exists(), "the crash point never fired"
    cluster.wait_until(lambda: "restarting it (restart 1)" in cluster.output(run), 30, "the first SMP restart")
    second = cluster.smp_info()["pid"]
    assert re.search(rf"serving job .* \(pid {second}\)", cluster.smp_log()), "not the restarted SMP"
    assert f"SMP of job {cluster.job} node 0 (pid {second})" in chaos(cluster, "kill-smp")
    out = wait_ok(cluster, run)
    assert final_hash(out) == golden2, f"seed {seed}"
    assert re.search(r"SMP of node 0 exited with code -9; restarting it \(restart 2\)", out), cluster.logs()
    log = cluster.smp_log()
    assert len(re.findall(r"re-adopted \d+ verified snapshot", log)) == 2, log
    assert len(re.findall(r"serving job .* \(pid \d+\)", log)) == 3, log
    assert cluster.segments() == []


def test_all_ranks_and_the_smp_killed_together(cluster, golden2):
    seed = random.randrange(2**32)
    step = random.Random(seed).randint(3, 15)
    print(f"seed {seed}: SIGKILL both ranks and the SMP after step {step}")
    run = cluster.ftmem_run([*TWO, "--max-restarts", "2"], [*STEPS, *SLOW])
    cluster.wait_for_line(run, f"step {step} loss")
    workers = cluster.workers(run)
    assert set(workers) == {0, 1}, workers
    smp = cluster.smp_info()["pid"]
    for w in workers.values():
        w.kill()
    kill(smp)
    out = wait_ok(cluster, run)
    assert final_hash(out) == golden2, f"seed {seed}"
    log = cluster.smp_log()
    assert re.search(r"re-adopted \d+ verified snapshot", log), log
    restored = restored_steps(out)
    assert restored and restored[0] >= step - 2, (restored, step, seed)
    assert "restarting it (restart 1)" in out


def _assert_self_started_smp_gone(cluster: Cluster) -> None:
    """The SMP a rank started exits once every rank closed, removing the job's segments."""
    cluster.wait_until(lambda: not job_processes(cluster) and not cluster.segments(), 30,
                       "the self-started SMP to exit and remove the job's segments")
    log = cluster.smp_log()
    assert "every rank of job" in log and "segments removed" in log, log
    assert not (cluster.runtime / f"{cluster.job}.n0.json").exists()


def test_hook_under_plain_torchrun(cluster, golden2):
    run = cluster.start([sys.executable, "-m", "torch.distributed.run", "--standalone", *TWO, str(EXAMPLE),
                         *STEPS], name="torchrun")
    out = wait_ok(cluster, run)
    assert "starting one" in out, "the hook did not start its own SMP"
    assert final_hash(out) == golden2
    _assert_self_started_smp_gone(cluster)


def test_hook_under_plain_python(cluster, golden1):
    out = wait_ok(cluster, cluster.python([str(EXAMPLE), *STEPS], name="python"))
    assert final_hash(out) == golden1
    _assert_self_started_smp_gone(cluster)


def test_rerun_of_a_failed_job_resumes_from_memory(cluster, golden2):
    """A failed job keeps its snapshots; a rerun with the same job id resumes from them bit-identically. A rerun
    with another world size (3 ranks; an elastic re-rendezvous that changed the node count looks the same) is
    refused with an error saying so, never started from step 0 beside them nor given 2 ranks' state for 3, and
    leaves them for the right rerun."""
    first = cluster.ftmem_run([*TWO, "--max-restarts", "0"], STEPS, name="first", FTMEM_CRASH_AT="mid_copy@13@1",
                              FTMEM_CRASH_MARKER=str(cluster.tmp / "crash"))
    out1 = cluster.wait(first, timeout=120)
    assert first.returncode != 0, "the job should have failed without restarts"
    assert "final-hash" not in out1
    kept = cluster.segments()
    assert kept, "a failed job must keep its snapshots in memory"
    cluster.wait_until(lambda: not job_processes(cluster), 30, "every process of the failed job to exit")

    three = cluster.ftmem_run(["--nproc-per-node", "3", "--max-restarts", "0"], STEPS, name="three")
    out3 = cluster.wait(three, timeout=120)
    assert three.returncode != 0, out3
    assert re.search(r"the snapshots in memory \(up to step 1[23]\) were taken by a world of 2 ranks, and this "
                     r"job has 3", out3), out3
    assert not restored_steps(out3) and "step 0 loss" not in out3, out3
    assert set(kept) <= set(cluster.segments()), "the old world's snapshots must be kept"
    cluster.wait_until(lambda: not job_processes(cluster), 30, "every process of the refused job to exit")

    second = cluster.ftmem_run(TWO, STEPS, name="second")
    out2 = wait_ok(cluster, second)
    assert restored_steps(out2) and restored_steps(out2)[0] == 12, out2
    assert "resumed-at-step 13" in out2
    assert final_hash(out2) == golden2
    assert "re-adopted" in cluster.smp_log()
    assert cluster.segments() == []


def test_ctrl_c_stops_the_job_and_keeps_its_snapshots(cluster):
    """SIGINT to ftmem-run's process group (a Ctrl-C; a scheduler's SIGTERM is handled the same way) ends the
    job with a line saying the snapshots are kept and how to resume, not a traceback, and exit code 128 + 2."""
    run = cluster.ftmem_run(TWO, [*STEPS, *SLOW], name="interrupted")
    cluster.wait_for_line(run, "step 5 loss")
    os.killpg(run.pid, signal.SIGINT)
    out = cluster.wait(run, timeout=60)
    assert run.returncode == 128 + signal.SIGINT, out
    assert f"job {cluster.job} stopped on node 0 by SIGINT; its snapshots are kept in memory: the same command " \
           f"resumes from them" in out, out
    assert "Traceback" not in out.split("stopped on node 0 by SIGINT")[1], out
    assert cluster.segments(), "the snapshots of an interrupted job must be kept"
    assert "stopped (segments kept)" in cluster.smp_log(), cluster.logs()


# ------------------------------------------------------------------------------------------------ corruption


def _snapshots(cluster: Cluster) -> dict[int, tuple[str, Header]]:
    """Complete snapshots of rank 0 in shared memory, by step."""
    found = {}
    for name in cluster.segments():
        seg = Segment.open(name, populate=False)
        try:
            h = Header.unpack(seg.buf[:HEADER_SIZE])
        except LayoutError:
            continue
        finally:
            seg.close()
        if h.state == BufferState.COMPLETE and h.rank == 0:
            found[h.step] = (name, h)
    return found


def _corrupt_newest(cluster: Cluster) -> tuple[int, str]:
    """Flip one byte in the middle of the largest tensor of the newest complete snapshot; (step, tensor)."""
    snaps = _snapshots(cluster)
    assert sorted(snaps) == [11, 12], snaps
    name, h = snaps[12]
    seg = Segment.open(name, populate=False)
    try:
        start = HEADER_SIZE + h.desc_off
        desc = Descriptor.unpack(bytes(seg.buf[start: start + h.desc_len]))
        assert (desc.step, desc.rank) == (12, 0)
        entry = max(desc.entries, key=lambda e: e.nbytes)
        pos = HEADER_SIZE + entry.offset + entry.nbytes // 2
        seg.buf[pos] ^= 0x10
    finally:
        seg.close()
    return 12, entry.name


def _crash_single_process_after_step_12(cluster: Cluster) -> None:
    crashed = cluster.python([str(EXAMPLE), *STEPS], name="crashed", FTMEM_CRASH_AT="after_local_commit@12",
                             FTMEM_CRASH_MARKER=str(cluster.tmp / "crash"))
    cluster.wait(crashed, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, cluster.logs()


def test_corrupt_snapshot_is_reported_not_loaded(cluster, golden1):
    """The SMP stays up while a snapshot is damaged: the rank's checksum check catches it, the restore fails
    naming rank, step and tensor, and the next attempt restores the older consistent step."""
    _crash_single_process_after_step_12(cluster)
    step, tensor = _corrupt_newest(cluster)
    print(f"flipped a byte of {tensor} in the snapshot of step {step}")

    failed = cluster.python([str(EXAMPLE), *STEPS], name="restore-corrupt")
    out = cluster.wait(failed, timeout=120)
    assert failed.returncode != 0, "a corrupt snapshot was loaded"
    assert "final-hash" not in out
    m = re.search(r"snapshot of step (\d+) for rank (\d+) is corrupt: .*covering (.*)", out)
    assert m, out
    assert (int(m.group(1)), int(m.group(2))) == (step, 0)
    assert tensor in m.group(3).split(", "), m.group(0)
    assert "restore failed on rank(s) [0]" in out

    again = cluster.python([str(EXAMPLE), *STEPS], name="restore-older")
    out = wait_ok(cluster, again)
    assert restored_steps(out) == [11]
    assert final_hash(out) == golden1


def test_corrupt_snapshot_is_dropped_when_the_smp_readopts(cluster, golden1):
    """The SMP dies too: the next SMP verifies every segment when it re-adopts them, drops the damaged one,
    and the rank restores the older consistent step."""
    _crash_single_process_after_step_12(cluster)
    kill(cluster.smp_info()["pid"])
    cluster.wait_until(lambda: not job_processes(cluster), 30, "the SMP to die")
    step, tensor = _corrupt_newest(cluster)
    out = wait_ok(cluster, cluster.python([str(EXAMPLE), *STEPS], name="restore"))
    log = cluster.smp_log()
    assert re.search(rf"rank 0 step {step}\) fails its checksums", log), log
    assert restored_steps(out) == [11]
    assert final_hash(out) == golden1


def test_state_the_gpt_example_lacks_restores_bit_identically_in_a_fresh_process(cluster):
    """Tied weights, BatchNorm, frozen and grad-less params, a module's extra state, a parameter outside the model
    and a numpy Generator's sampler (tests/train_mixed.py): a crash after step 12, then a rerun from memory."""
    script = [str(Path(__file__).parent / "train_mixed.py"), "20"]
    golden = final_hash(wait_ok(cluster, cluster.python(script, name="mixed-golden")))
    crashed = cluster.python(script, name="mixed-crashed", FTMEM_CRASH_AT="after_local_commit@12",
                             FTMEM_CRASH_MARKER=str(cluster.tmp / "crash"))
    cluster.wait(crashed, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, cluster.logs()
    out = wait_ok(cluster, cluster.python(script, name="mixed-resumed"))
    assert restored_steps(out) == [12], out
    assert final_hash(out) == golden


STALLED_RANK_SCRIPT = r'''
import os, time
import torch
import torch.distributed as dist
from ftmem import Snapshotter

dist.init_process_group("gloo")
if dist.get_rank() == 1:
    time.sleep(600)  # stopped before restore(): a hung or SIGSTOPped rank
model = torch.nn.Linear(2, 2)
Snapshotter(model, torch.optim.SGD(model.parameters(), lr=0.1)).restore()
'''


def test_a_rank_that_never_reaches_restore_fails_the_others_within_the_timeout(cluster):
    """restore() is collective. A rank that never joins it must not hold the others for the default process
    group's timeout (30 minutes with gloo): they fail after twice FTMEM_TIMEOUT with an error that says why."""
    script = cluster.tmp / "stalled_rank.py"
    script.write_text(STALLED_RANK_SCRIPT)
    run = cluster.start([sys.executable, "-m", "torch.distributed.run", "--standalone", *TWO, str(script)],
                        name="torchrun", FTMEM_TIMEOUT="5")
    out = cluster.wait(run, 120)
    assert run.returncode != 0, out
    assert "ftmem: rank 0: not every rank took part in restore() within 10s" in out, out
