"""Cost of node-level protection (erasure coding across SMPs) and of recovering a lost node, vs baselines.

A simulated 3-node job (one `ftmem-run --nnodes 3 --node-rank i` per node, one rank each, EC group of 3 with
f=1, loopback only) trains `examples/train_gpt.py` with a snapshot every step and a model whose per-rank
snapshot is ~170 MB (`--dim 384 --layers 8`: parameters + AdamW state). Everything is measured side by side in
one run, and reported as ratios:

1. **Encode.** Every 0.25 s the bench asks each SMP for `status` (its control socket) and records `ec_stats`;
   every new `last_round_s` is one round of that SMP. `last_round_bytes` is the data of the whole group
   (`sum(layout.sizes)`); each SMP computes the parity of 1/n of the stripes, reading f x its own data size
   (the k data chunks of its parity stripes). So the per-SMP encode rate is (its input bytes) / last_round_s,
   compared with raw `zfec.Encoder(k, n).encode` over chunk-sized blocks of the same (k, n, chunk), timed in
   this process. Rounds are sampled while training, and in a *paused window*: the 3 workers are SIGSTOPped,
   the SMPs go quiet, one more step is let through and commits, the workers are stopped again, and the round
   of that step runs with nothing else of the job on the cores; raw zfec runs right after, still paused (the
   apples-to-apples comparison on a machine where ranks and SMPs share the cores). Raw zfec is also timed
   while the job trains and with no job running. The SMPs' CPU seconds per paused round (psutil, all 3)
   against raw zfec's compare the work done, independently of contention. The SMP's round is not just zfec:
   it fetches every chunk from its owner over the peer protocol (zmq TCP on loopback, 16 MiB requests, two
   batches coded at once while the next is received and the one after served), with a Poly1305 MAC of every
   frame on both ends, copies out of shared memory on the serving side, pads short chunks and writes parity to
   shared memory. A breakdown table times each of those steps (wall and CPU) on the same amount of data in this
   process, with ftmem's own NodeData / PeerCodec / encode_parity, to show where the time goes. Also: rounds
   ok / failed and why (SMP log), lag at the kill.
   **The SMP path alone** (`smp_path`): still paused, the bench runs ftmem's own `encode_round` (members in
   turn) and `rebuild_node` for node 2 against the three live SMPs (serving only), in a child process run as an
   SMP (a session of its own at the SMPs' nice, glibc keeping freed frames), each right after raw zfec on the
   same stripes in that process: one SMP's encode and decode path without the other two encoding on the same
   cores, as on a cluster where each has its own node. The ratio is the median over these pairs (and best vs
   best). The rebuilt data must pass its commit-time checksums.
2. **Rebuild.** After the measured steps and the paused window node 2 is killed whole
   (`ftmem.chaos.kill_node`: launcher, worker, SMP, segments) right after a step line, and a replacement
   node 2 is started at once. Its SMP log gives
   the rebuilt data bytes and `rebuilt ... in X s` (its `ec_stats.rebuild_s`: from the end of the probe to the
   end of the rebuild, checksum verification of the rebuilt payload included); parity bytes come from its
   layout. Compared with raw zfec doing the same stripes: `Decoder.decode` of the node's data stripes from
   the survivors' blocks + `Encoder.encode` of its parity stripes.
3. **Step time at snapshot-every-step.** The same 3-rank job (same arguments) three ways: plain
   `python -m torch.distributed.run --standalone --nproc-per-node 3 ... --no-ftmem`; the same torchrun job
   with the hook (it starts one node-local SMP: snapshots, no peers, no EC); the 3-node `ftmem-run` job with
   EC. Rank 0 prints `step N loss` after the loss all-reduce, i.e. after every rank finished step N; the bench
   reads every process's output through a pipe and stamps each line with `time.time()` on arrival. The
   interval between the arrival of `step N-1` and `step N` is the job's step time (the pipe's latency is the
   same for both lines and cancels). The first warm-up steps (DDP's first iterations, the first snapshots:
   the SMP allocates and the rank maps its buffers) are skipped; the headline is the median.
4. **Time to resume.** From the replacement's start (Popen) to: its SMP serving, its rebuild starting and
   ending (SMP log time stamps), its rank's `restored step` line, rank 0's `resumed-at-step` line (printed
   once every rank restored) and the first step after it (arrival times). Against a restart from a
   torch.distributed.checkpoint of the same model + optimizer state (same config, after one step) on local
   disk (page cache warm: it was just written, the best case for DCP): `dcp.save` in a process; `dcp.load` +
   `set_state_dict` in a fresh process (and that process's whole life up to loaded: interpreter, import
   torch, building the model, load); and a whole fresh 3-rank torchrun job (process start + rendezvous +
   model build + `dcp.load` on every rank + barrier, then its first step).

After the resume the bench waits (`--post-resume-wait`) for the first EC round to end, and reports it if none
does. `--check-hash` runs the EC job to its end and compares its final hash with the plain job's (the recovery
must be bit-identical); without it the bench ends the EC job itself (kill_node of every node) a few steps
after the resume. At exit (also on failure or Ctrl-C) it kills every process group it started and every SMP
it saw by PID, unlinks the /dev/shm segments of its job ids, and reports anything the jobs left behind.
Private FTMEM_RUNTIME_DIR, unique job ids, OMP_NUM_THREADS=1, loopback only, every wait bounded (--timeout).

    .venv/bin/python bench/bench_protect.py            # ~3.5 min on 2 busy cores
    .venv/bin/python bench/bench_protect.py --quick    # ~2.3 min there (< 2 min on quiet cores)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_gpt.py"
STEP_RE = re.compile(r"^step (\d+) loss ")
RESTORED_RE = re.compile(r"rank (\d+) restored step (\d+) from (.+): (\d+) bytes in ([\d.]+)s")
REBUILDING_RE = re.compile(r"rebuilding node (\d+)'s snapshot of step (\d+) \((\d+) rank\(s\), (\d+) bytes\)")
REBUILT_RE = re.compile(r"rebuilt node (\d+)'s snapshot of step (\d+) in ([\d.]+)s")
FAILED_RE = re.compile(r"EC round of step \d+ (?:failed on node \d+: (.*)|(timed out))")
LOGTIME_RE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass




# ------------------------------------------------------------------------------------------------- processes


class Proc:
    """A process group started by the bench; its output is read by a thread, each line stamped on arrival."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.t_start = time.time()
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                      stdin=subprocess.DEVNULL, start_new_session=True, bufsize=0)
        self.reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "wb") as out:
            for raw in iter(self.popen.stdout.readline, b""):
                t = time.time()
                out.write(raw)
                out.flush()
                with self.cond:
                    self.lines.append((t, raw.decode(errors="replace").rstrip("\n")))
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def find(self, pred, after: float = 0.0) -> tuple[float, str] | None:
        with self.cond:
            for t, line in self.lines:
                if t > after and pred(line):
                    return t, line
        return None

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def wait_line(procs: list[Proc], pred, timeout: float, what: str, after: float = 0.0,
              require_alive: bool = True) -> tuple[Proc, float, str]:
    """The first line (arrived after `after`) of any of `procs` matching `pred`; BenchError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            hit = p.find(pred, after)
            if hit is not None:
                return p, hit[0], hit[1]
        if require_alive and not any(p.alive() for p in procs):
            time.sleep(0.3)  # let the readers drain
            for p in procs:
                hit = p.find(pred, after)
                if hit is not None:
                    return p, hit[0], hit[1]
            raise BenchError(f"{what}: every process exited first (logs: {[str(p.log) for p in procs]})")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not seen within {timeout:.0f}s (logs: {[str(p.log) for p in procs]})")
        time.sleep(0.02)


def wait_exit(procs: list[Proc], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what}: {p.name} still running after {timeout:.0f}s (log {p.log})") from None
        p.reader.join(timeout=5)


class Session:
    """Private runtime dir, unique job ids, every process started, and the cleanup of all of it."""

    def __init__(self, keep: bool) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="ftmem-bench-protect-"))
        self.run = self.work / "run"
        self.run.mkdir(mode=0o700)
        os.environ["FTMEM_RUNTIME_DIR"] = str(self.run)  # kill_node and NodeEnv derive paths from it
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "FTMEM_RUNTIME_DIR": str(self.run)}
        for var in ("FTMEM_JOB_ID", "FTMEM_NODE_ID", "FTMEM_SMP_ADDR", "FTMEM_MANAGED"):
            self.env.pop(var, None)
        self.tag = uuid.uuid4().hex[:6]
        self.jobs: list[str] = []
        self.procs: list[Proc] = []
        self.smps: dict[int, tuple[float, str]] = {}  # pid -> (create_time, job) of every SMP seen
        self.keep = keep
        self.failed = False
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_smps, name="smp-watch", daemon=True)
        self._watch.start()
        atexit.register(self.cleanup)

    def job_id(self, what: str) -> str:
        job = f"bp{self.tag}-{what}"
        self.jobs.append(job)
        return job

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, {**self.env, **(extra_env or {})}, self.work / f"{name}.log")
        self.procs.append(proc)
        return proc

    def note_smp(self, pid: int, job: str) -> None:
        import psutil

        if pid in self.smps:
            return
        try:
            self.smps[pid] = (psutil.Process(pid).create_time(), job)
        except psutil.NoSuchProcess:
            pass

    def _watch_smps(self) -> None:
        """Record the pid of every SMP of our jobs (from its info file) so that cleanup can end it by PID."""
        while not self._stop.wait(0.5):
            try:
                names = os.listdir(self.run)
            except OSError:
                continue
            for name in names:
                if name.endswith(".json"):
                    try:
                        info = json.loads((self.run / name).read_text())
                        if info.get("job") in self.jobs:
                            self.note_smp(int(info["pid"]), info["job"])
                    except (OSError, ValueError, KeyError, TypeError):
                        pass

    def leftovers(self) -> tuple[list[int], list[str]]:
        import psutil

        alive = []
        for pid, (created, job) in self.smps.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        segs = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"ftmem.{j}.") for j in self.jobs)]
        return alive, segs

    def cleanup(self) -> None:
        import psutil

        self._stop.set()
        for p in self.procs:
            p.kill()
        alive, _ = self.leftovers()
        for pid in alive:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs([psutil.Process(pid) for pid in alive if psutil.pid_exists(pid)], timeout=10)
        _, segs = self.leftovers()
        for name in segs:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
        if self.keep or self.failed:
            say(f"logs kept in {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        atexit.unregister(self.cleanup)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_time(line: str) -> float | None:
    """Wall-clock time of an ftmem log line (`[2026-01-01 12:00:00,123] ftmem ...`)."""
    m = LOGTIME_RE.match(line)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000


def step_arrivals(procs: list[Proc], after: float = 0.0, before: float = float("inf")) -> dict[int, float]:
    """step -> arrival time of its `step N loss` line (rank 0 prints them; whichever node holds rank 0)."""
    out: dict[int, float] = {}
    for p in procs:
        with p.cond:
            for t, line in p.lines:
                m = STEP_RE.match(line)
                if m and after < t < before:
                    out.setdefault(int(m.group(1)), t)
    return out


def intervals(arrivals: dict[int, float], first: int, last: int) -> list[float]:
    return [arrivals[s] - arrivals[s - 1] for s in range(first, last + 1) if s in arrivals and s - 1 in arrivals]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def final_hash(procs: list[Proc]) -> str | None:
    for p in procs:
        hit = p.find(lambda line: line.startswith("final-hash "))
        if hit:
            return hit[1].split()[1]
    return None


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -------------------------------------------------------------------------------------------------- raw zfec


def random_buffer(nbytes: int) -> memoryview:
    import numpy as np

    return memoryview(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)).cast("B")


def stripes_of(buf: memoryview, k: int, chunk: int, count: int) -> list[tuple[memoryview, ...]]:
    per = k * chunk
    have = len(buf) // per
    return [tuple(buf[(s % have) * per + i * chunk: (s % have) * per + (i + 1) * chunk] for i in range(k))
            for s in range(count)]


def raw_encode_s(stripes, k: int, n: int) -> float:
    import zfec

    enc, nums = zfec.Encoder(k, n), tuple(range(k, n))
    start = time.perf_counter()
    for blocks in stripes:
        enc.encode(blocks, nums)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ the three jobs


def train_args(args: argparse.Namespace, steps: int) -> list[str]:
    return [str(TRAIN), "--dim", str(args.dim), "--layers", str(args.layers), "--steps", str(steps)]


def run_torchrun(sess: Session, args: argparse.Namespace, hook: bool, steps: int) -> dict:
    """The same 3-rank job under plain torchrun: without the hook, or with it (one node-local SMP, no EC)."""
    name = "torchrun-hook" if hook else "torchrun-plain"
    job = sess.job_id("hook" if hook else "plain")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
            *train_args(args, steps), *([] if hook else ["--no-ftmem"])]
    say(f"{name}: {shlex.join(argv[2:])}")
    proc = sess.start(name, argv, {"FTMEM_JOB_ID": job} if hook else None)
    wait_exit([proc], args.timeout, name)
    if proc.popen.returncode != 0:
        raise BenchError(f"{name} exited with {proc.popen.returncode}; see {proc.log}")
    arr = step_arrivals([proc])
    if len(arr) < steps:
        raise BenchError(f"{name}: only {len(arr)} of {steps} step lines; see {proc.log}")
    return {"cmd": shlex.join(["torchrun", *argv[3:]]), "arrivals": arr, "hash": final_hash([proc]),
            "startup_s": arr[0] - proc.t_start, "job": job}


class StatusPoller:
    """Polls every node's SMP `status` (control socket) and keeps every reply with its time."""

    def __init__(self, sess: Session, job: str, nodes: int, period: float = 0.25) -> None:
        from ftmem.smp.protocol import ControlClient

        self.sess, self.job = sess, job
        self.clients = {i: ControlClient(f"ipc://{sess.run}/{job}.n{i}.sock", timeout=2.0, retry_interval=1.0)
                        for i in range(nodes)}
        self.samples: list[tuple[float, int, dict]] = []
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for i, client in self.clients.items():
                try:
                    st = client.call("status", timeout=1.0)
                except Exception:
                    continue
                self.sess.note_smp(int(st["pid"]), self.job)
                self.samples.append((time.time(), i, st))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for c in self.clients.values():
            c.close()

    def latest(self, node: int, after: float = 0.0) -> dict | None:
        for t, i, st in reversed(self.samples):
            if i == node and t > after:
                return st
        return None

    def rounds(self, after: float, before: float, pid: int | None = None) -> list[dict]:
        """One entry per round seen (a new `last_round_s` of a node), first seen in (after, before)."""
        seen: set[tuple[int, float]] = set()
        out = []
        for t, i, st in self.samples:
            ec = st.get("ec_stats") or {}
            if ec.get("last_round_s") is None or (pid is not None and st["pid"] != pid):
                continue
            key = (i, ec["last_round_s"])
            if key in seen:
                continue
            seen.add(key)
            if after < t < before:
                out.append({"t": t, "node": i, **ec, "committed": st.get("committed"),
                            "protected": st.get("protected")})
        return out


def launcher_workers(launcher_pid: int) -> list:
    """The train_gpt worker processes under one launcher (found by PID from the launcher down)."""
    import psutil

    try:
        kids = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for c in kids:
        try:
            if str(TRAIN) in " ".join(c.cmdline()):
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out


class WorkerWatch:
    """Records when each launcher's (new) worker process appears: the earliest create_time after `after`."""

    def __init__(self, launchers: dict[str, int], after: float) -> None:
        self.launchers, self.after = launchers, after
        self.started: dict[str, float] = {}
        self.procs: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1) and len(self.started) < len(self.launchers):
            for name, pid in self.launchers.items():
                if name not in self.started:
                    new = sorted((w.create_time(), w.pid, w) for w in launcher_workers(pid)
                                 if w.create_time() > self.after)
                    if new:
                        self.started[name], _, self.procs[name] = new[0]

    def cpu(self) -> dict[str, float]:
        """CPU seconds each new worker has used so far."""
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except Exception:
                pass
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def smp_cpu(procs: dict) -> float:
    import psutil

    total = 0.0
    for p in procs.values():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def wait_smps_quiet(procs: dict, timeout: float, threshold: float = 0.10, period: float = 1.0) -> float:
    """Wait until the SMPs together use less than `threshold` CPU-s per `period` (no round running)."""
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    last = smp_cpu(procs)
    while time.monotonic() < deadline:
        time.sleep(period)
        now = smp_cpu(procs)
        if now - last < threshold:
            return time.monotonic() - start
        last = now
    raise BenchError(f"the SMPs did not go quiet within {timeout:.0f}s")


def signal_all(procs: list, sig: int) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run_ec_job(sess: Session, args: argparse.Namespace, plan: SimpleNamespace) -> dict:
    """3 simulated nodes under ftmem-run (EC group of 3, f=1); measure, kill node 2, replace it, measure.

    Timeline (steps are the job's): warm-up | measured window (step times, rounds while training) | paused
    window (the 3 workers SIGSTOPped: one clean round, raw zfec beside it) | raw zfec while training, then
    `before_kill` more steps | kill node 2 right after a step line, start the replacement | resume | `after`
    steps | up to `post_resume_wait` s for an EC round to end | end (kill_node of every node, or, with
    --check-hash, the job runs to its last step).
    """
    import psutil

    from ftmem.chaos import kill_node
    from ftmem.env import NodeEnv
    from ftmem.smp.process import effective_nice
    from ftmem.smp.protocol import ControlClient

    job, port, secret = sess.job_id("ec"), free_port(), uuid.uuid4().hex
    common = ["--nnodes", "3", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--rdzv-id", job, "--max-restarts", "3",
              *(["--rdzv-conf", args.rdzv_conf] if args.rdzv_conf else [])]
    train = train_args(args, plan.ec_steps)

    def node(i: int, name: str) -> Proc:
        return sess.start(name, [sys.executable, "-m", "ftmem.launcher.main", *common, "--node-rank", str(i),
                                 *train], {"FTMEM_SECRET": secret})

    cmd = shlex.join(["ftmem-run", *common, "--node-rank", "I", *[str(a) for a in train]])
    say(f"ec job: {cmd}")
    smp_log = {i: sess.run / f"{job}.n{i}.smp.log" for i in range(3)}
    nodes = {0: node(0, "ec-node0")}
    deadline = time.monotonic() + args.timeout
    while not (smp_log[0].exists() and "peer endpoint" in smp_log[0].read_text(errors="replace")):
        if not nodes[0].alive() or time.monotonic() > deadline:
            raise BenchError(f"ec node 0's SMP never printed 'peer endpoint' (see {smp_log[0]}, {nodes[0].log})")
        time.sleep(0.05)
    for i in (1, 2):
        nodes[i] = node(i, f"ec-node{i}")
    poller = StatusPoller(sess, job, 3)
    procs = list(nodes.values())
    out: dict = {"cmd": cmd, "job": job}
    stopped: list = []
    live = procs
    try:
        W, last = plan.warmup, plan.warmup + plan.measure - 1
        _, t_w, _ = wait_line(procs, lambda s: s.startswith(f"step {W - 1} "), args.timeout, "ec job warm-up")
        smps = {}
        for i in range(3):
            st = None
            for _ in range(40):
                if (st := poller.latest(i)):
                    break
                time.sleep(0.1)
            if st is None:
                raise BenchError(f"ec job: no status from node {i}'s SMP")
            smps[i] = psutil.Process(st["pid"])
        st_w0 = {i: poller.latest(i) for i in range(3)}
        cpu0 = smp_cpu(smps)
        _, t_last, _ = wait_line(procs, lambda s: s.startswith(f"step {last} "), args.timeout, "ec job steps")
        out.update(t_w=t_w, t_last=t_last, window_s=t_last - t_w, window_cpu=smp_cpu(smps) - cpu0,
                   status_w0=st_w0, status_w1={i: poller.latest(i) for i in range(3)},
                   rounds=poller.rounds(t_w, t_last), load_training=loadavg())
        group = next((x["last_round_bytes"] for x in reversed(out["rounds"])), None)
        if group is None:
            group = next(((s or {}).get("ec_stats", {}).get("last_round_bytes") for s in out["status_w1"].values()
                          if (s or {}).get("ec_stats", {}).get("last_round_bytes")), None)
        if not group:
            raise BenchError("ec job: no EC round finished its encode during the measured window")
        share = out["share"] = plan.layout_for(group)
        buf = random_buffer(share["node_stripes"] * share["k"] * share["chunk"])
        stripes = stripes_of(buf, share["k"], share["chunk"], share["node_stripes"])
        raw_encode_s(stripes[:2], share["k"], 3)

        def raw_reps(reps: int) -> list[tuple[float, float]]:
            res = []
            for _ in range(reps):
                c0, w0 = time.process_time(), time.perf_counter()
                raw_encode_s(stripes, share["k"], 3)
                res.append((time.perf_counter() - w0, time.process_time() - c0))
            return res

        # Paused window: stop the 3 workers, let the SMPs finish what they do, let exactly one more step
        # commit, stop again: that step's round runs with training stopped (only the SMPs and this process,
        # besides whatever else the machine runs). Then raw zfec on the same bytes, still paused.
        workers = [w for p in procs for w in launcher_workers(p.popen.pid)]
        if len(workers) != 3:
            raise BenchError(f"ec job: expected 3 workers, found {[w.pid for w in workers]}")
        stopped = workers
        signal_all(workers, signal.SIGSTOP)
        quiet1 = wait_smps_quiet(smps, 60)
        cpu_a = smp_cpu(smps)
        time.sleep(0.6)  # one more status poll of every node
        ok_a = {i: dict((poller.latest(i) or {}).get("ec_stats") or {}) for i in range(3)}
        t_cont = time.time()
        signal_all(workers, signal.SIGCONT)
        _, _, xline = wait_line(procs, lambda s: STEP_RE.match(s) is not None, args.timeout,
                                "ec job step in the paused window", after=t_cont)
        x = int(STEP_RE.match(xline).group(1))
        # stop them the moment the leader (node 0) commits x, which starts the round: the poller's samples are
        # up to a period old, and the workers' next step would share the cores with the round meanwhile
        leader = ControlClient(f"ipc://{sess.run}/{job}.n0.sock", timeout=2.0, retry_interval=0.2)
        try:
            end = time.monotonic() + 30
            while (leader.call("status").get("committed") or -1) < x:
                if time.monotonic() > end:
                    raise BenchError(f"ec job: step {x} did not commit on node 0 within 30s")
                time.sleep(0.01)
        finally:
            leader.close()
        signal_all(workers, signal.SIGSTOP)
        quiet2 = wait_smps_quiet(smps, 90)
        cpu_b = smp_cpu(smps)
        time.sleep(0.6)
        ok_b = {i: dict((poller.latest(i) or {}).get("ec_stats") or {}) for i in range(3)}
        paused_raw = raw_reps(plan.repeat)
        endpoints = {i: (poller.latest(i) or {}).get("endpoint") for i in range(3)}
        out["path_nice"] = effective_nice(smps[0].pid)
        out["path"] = run_smp_path(endpoints, secret, job, out["path_nice"], 3 * plan.repeat, args.timeout)
        stopped = []
        signal_all(workers, signal.SIGCONT)
        out.update(paused_step=x, paused_rounds=poller.rounds(t_cont, time.time()), paused_cpu=cpu_b - cpu_a,
                   paused_ec=(ok_a, ok_b), paused_raw=paused_raw, paused_status=[poller.latest(i) for i in range(3)],
                   paused_wall=time.time() - t_cont, paused_quiet=(quiet1, quiet2), load_paused=loadavg())

        # Raw zfec while the same job trains (these steps are in no other measurement); meanwhile the rounds
        # go on as in normal operation, so the protected step at the kill is what training gives.
        loaded = []
        end = time.monotonic() + plan.loaded_s
        while time.monotonic() < end or len(loaded) < 2:
            loaded += raw_reps(1)
        out["loaded"] = loaded
        del stripes, buf
        for _ in range(plan.before_kill):
            wait_line(procs, lambda s: STEP_RE.match(s) is not None, args.timeout, "ec job steps before the kill",
                      after=time.time())

        # Kill node 2 whole right after the next step line, and start a replacement at once.
        _, _, kline = wait_line(procs, lambda s: STEP_RE.match(s) is not None, args.timeout,
                                "ec job step before the kill", after=time.time())
        kill_step = int(STEP_RE.match(kline).group(1))
        st_before = {i: poller.latest(i) for i in range(3)}
        offset = smp_log[2].stat().st_size if smp_log[2].exists() else 0
        t_kill = time.time()
        pids = kill_node(nodes[2].popen.pid, NodeEnv(job, 2))
        t_killed = time.time()
        nodes[2].popen.wait(timeout=10)
        say(f"ec job: killed node 2 after step {kill_step} (pids {pids}, {t_killed - t_kill:.1f}s); "
            f"starting its replacement")
        rep = node(2, "ec-node2-replacement")
        live = [nodes[0], nodes[1], rep]
        watch = WorkerWatch({p.name: p.popen.pid for p in live}, t_kill)
        try:
            # A job with no protected step restarts from step 0 (no resumed-at-step line then).
            _, t_resumed, rline = wait_line(live, lambda s: s.startswith(("resumed-at-step ", "step 0 loss")),
                                            args.timeout, "resume after the node loss", after=t_kill)
            resumed_at = int(rline.split()[1]) if rline.startswith("resumed") else 0
            worker_cpu = watch.cpu()
            _, t_first, _ = wait_line(live, lambda s: s.startswith(f"step {resumed_at} "), args.timeout,
                                      "first step after the resume", after=t_kill)
            wait_line(live, lambda s: s.startswith(f"step {resumed_at + plan.after} "), args.timeout,
                      "steps after the resume", after=t_kill)
        finally:
            watch.stop()
        out.update(kill_step=kill_step, status_before_kill=st_before, t_kill=t_kill, t_killed=t_killed,
                   t_rep=rep.t_start, t_resumed=t_resumed, resumed_at=resumed_at, t_first=t_first,
                   workers_started=watch.started, worker_cpu_at_resume=worker_cpu,
                   status_replacement=poller.latest(2, after=t_killed))

        # Protection after the resume: wait (bounded) for the first EC round to end on the leader (node 0).
        def rounds_ended(st: dict | None) -> int:
            e = (st or {}).get("ec_stats") or {}
            return e.get("rounds_ok", 0) + e.get("rounds_failed", 0)
        base = rounds_ended(st_before[0])
        end = time.monotonic() + plan.post_resume_wait
        first_round = None
        while time.monotonic() < end and all(p.alive() for p in live):
            hit = next(((t, st) for t, i, st in poller.samples if i == 0 and t > t_resumed
                        and rounds_ended(st) > base), None)
            if hit:
                first_round = {"t": hit[0], "committed": hit[1].get("committed"),
                               "protected": hit[1].get("protected"), "ok": hit[1]["ec_stats"]["rounds_ok"]}
                break
            time.sleep(0.25)
        steps_then = step_arrivals(live, after=t_resumed)
        out.update(first_round_after_resume=first_round, post_resume_waited=time.time() - t_resumed,
                   newest_step_after_resume=max(steps_then) if steps_then else None,
                   smp0_after_kill=[line for line in smp_log[0].read_text(errors="replace").splitlines()
                                    if (log_time(line) or 0) > t_kill and " ftmem smp " in line],
                   after_arrivals=step_arrivals(live, after=t_first - 0.001))
        if args.check_hash:
            wait_exit(live, args.timeout, "ec job")
            bad = [p.name for p in live if p.popen.returncode != 0]
            if bad:
                raise BenchError(f"ec job: {bad} failed; see their logs")
            out["hash"] = final_hash(live)
    finally:
        if stopped:
            signal_all(stopped, signal.SIGCONT)
        poller.stop()
        # End the job (and its SMPs, and their segments) node by node, whether or not a launcher is still
        # running: a launcher that failed leaves its SMP's segments behind on purpose (rerun resumes).
        for i, p in reversed(list(zip(range(3), live))):
            kill_node(p.popen.pid, NodeEnv(job, i))
            p.popen.wait(timeout=10)

    # The replacement's SMP log (appended to the dead node's): serving, rebuild started, rebuilt.
    smp2 = smp_log[2].read_bytes()[offset:].decode(errors="replace").splitlines()
    ev: dict[str, float | None] = {}
    rebuilding = rebuilt = None
    for line in smp2:
        if "serving job" in line and "serving" not in ev:
            ev["serving"] = log_time(line)
        if "peer endpoint" in line and "peer" not in ev:
            ev["peer"] = log_time(line)
        if (m := REBUILDING_RE.search(line)) and rebuilding is None:
            ev["rebuild_start"], rebuilding = log_time(line), m
        if (m := REBUILT_RE.search(line)) and rebuilt is None:
            ev["rebuilt"], rebuilt = log_time(line), m
    restored = {}
    for p in live:
        hit = p.find(lambda s: RESTORED_RE.search(s) is not None, after=t_kill)
        if hit:
            m = RESTORED_RE.search(hit[1])
            restored[p.name] = {"t": hit[0], "rank": int(m.group(1)), "step": int(m.group(2)),
                                "source": m.group(3), "bytes": int(m.group(4)), "seconds": float(m.group(5))}
    reasons: dict[str, int] = {}
    for line in smp_log[0].read_text(errors="replace").splitlines():
        if (m := FAILED_RE.search(line)) and (log_time(line) or 0) < t_kill:
            why = m.group(1) or "timed out"
            key = ("buffer reused" if "reused" in why or "no longer held" in why else
                   "timed out" if "timed out" in why else why[:80])
            reasons[key] = reasons.get(key, 0) + 1
    out.update(arrivals=step_arrivals(procs, before=t_kill), smp_events=ev, restored=restored, fail_reasons=reasons,
               rebuilding=rebuilding and rebuilding.groups(), rebuilt=rebuilt and rebuilt.groups())
    return out


def run_dcp(sess: Session, args: argparse.Namespace, fresh_load: bool) -> dict:
    """DCP baseline: save the same state; load it in a fresh process; restart a whole 3-rank job from it."""
    ckpt = sess.work / "dcp"
    me = str(Path(__file__).resolve())
    model = ["--dim", str(args.dim), "--layers", str(args.layers)]
    save = sess.start("dcp-save", [sys.executable, me, "--worker", "save", str(ckpt), *model])
    wait_exit([save], args.timeout, "dcp save")
    saved = json.loads(wait_line([save], lambda s: s.startswith("DCP "), 5, "dcp save result")[2][4:])
    out = {"save": saved, "bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())}
    if fresh_load:
        load = sess.start("dcp-load", [sys.executable, me, "--worker", "load", str(ckpt), *model])
        _, t_loaded, _ = wait_line([load], lambda s: s.startswith("DCP "), args.timeout, "dcp load")
        wait_exit([load], args.timeout, "dcp load")
        loaded = json.loads(load.find(lambda s: s.startswith("DCP "))[1][4:])
        loaded["process_s"] = t_loaded - load.t_start
        out.update(load=loaded, hash_ok=saved["hash"] == loaded["hash"])
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", me,
            "--worker", "job", str(ckpt), *model]
    job = sess.start("dcp-job", argv)
    _, t_jl, jline = wait_line([job], lambda s: s.startswith("DCP "), args.timeout, "dcp job load")
    _, t_js, _ = wait_line([job], lambda s: STEP_RE.match(s) is not None, args.timeout, "dcp job first step")
    wait_exit([job], args.timeout, "dcp job")
    out["job"] = {**json.loads(jline[4:]), "to_loaded_s": t_jl - job.t_start, "to_first_step_s": t_js - job.t_start}
    return out


# ----------------------------------------------------------------------------------- the SMP path, piecewise


def pipeline_breakdown(share: dict, repeat: int) -> dict[str, float]:
    """Time each step an SMP's encode round applies to its input, on the same bytes, in this process (idle).

    Uses ftmem's own pieces where they exist: NodeData.read (the serving side's view of shared memory),
    PeerCodec.pack / unpack (ChaCha20-Poly1305 tag on send and receive), zmq ROUTER/DEALER over tcp loopback in 16 MiB
    replies (send and receive copy=False, as PeerLink does), ftmem.erasure.encode_parity, and the parity
    write into a shared mapping. The round does them one after the other (one member at a time, then encode).
    """
    import mmap

    import zmq

    from ftmem.erasure import encode_parity
    from ftmem.smp.layout import HEADER_SIZE
    from ftmem.smp.nodedata import NodeData, Part
    from ftmem.smp.peer import PeerCodec
    from ftmem.smp.process import keep_freed_memory
    from ftmem.smp.protect import BATCH_BYTES

    keep_freed_memory()  # as the SMP does

    k, chunk, nstripes = share["k"], share["chunk"], share["node_stripes"]
    total = nstripes * k * chunk  # this SMP's encode input
    seg = mmap.mmap(-1, HEADER_SIZE + total, flags=mmap.MAP_SHARED)
    seg[HEADER_SIZE: HEADER_SIZE + total] = random_buffer(total)  # written once: touched, like a snapshot
    data = NodeData([Part(0, SimpleNamespace(segment=SimpleNamespace(buf=seg)), total)])
    codec = PeerCodec(b"x" * 32, "bench", 0)
    per_req = max(1, BATCH_BYTES // chunk)
    ranges = [(i * chunk, chunk) for i in range(nstripes * k)]
    batches = [ranges[i: i + per_req] for i in range(0, len(ranges), per_req)]
    out: dict[str, list[float]] = {}
    cpu_out: dict[str, list[float]] = {}

    def timed(name: str, fn) -> object:
        start, cpu = time.perf_counter(), time.process_time()
        res = fn()
        out.setdefault(name, []).append(time.perf_counter() - start)
        cpu_out.setdefault(name, []).append(time.process_time() - cpu)
        return res

    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    parity = mmap.mmap(-1, nstripes * chunk, flags=mmap.MAP_SHARED)
    parity[:] = b"\0" * len(parity)
    try:
        for _ in range(repeat):
            replies = []
            for batch in batches:
                blobs = timed("serve: NodeData.read (a view of shm)", lambda b=batch: [data.read(o, n) for o, n in b])
                frames = timed("serve: MAC sign (PeerCodec.pack)",
                               lambda bl=blobs: codec.pack("reply", 1, bl, ok=True, error="", body=b""))
                replies.append(frames)
            received = []
            for frames in replies:
                def xfer(fr=frames):
                    dealer.send(b"req")
                    ident = router.recv_multipart()[0]
                    router.send_multipart([ident, *fr], copy=False)
                    return [f.buffer for f in dealer.recv_multipart(copy=False)]
                received.append(timed("zmq tcp loopback transfer", xfer))
            blocks = []
            for fr in received:
                blocks.extend(timed("receive: MAC verify (PeerCodec.unpack)", lambda f=fr: codec.unpack(f)[1]))
            del replies, received
            par = timed("zfec encode (ftmem encode_parity)",
                        lambda: [encode_parity(k, 3, blocks[s * k:(s + 1) * k], [0])[0] for s in range(nstripes)])

            def write() -> None:
                for s, p in enumerate(par):
                    parity[s * chunk:(s + 1) * chunk] = p
            timed("parity write into shm", write)
            del blocks, par
    finally:
        router.close(0)
        dealer.close(0)
        parity.close()  # `seg` is unmapped with the last view of it served (zmq frees sent frames on its own thread)
    # each piece: its time summed over one pass, median over the passes; (wall, CPU of this process)
    per_pass = {}
    for name, v in out.items():
        n = len(v) // repeat
        c = cpu_out[name]
        per_pass[name] = (statistics.median(sum(v[r * n:(r + 1) * n]) for r in range(repeat)),
                          statistics.median(sum(c[r * n:(r + 1) * n]) for r in range(repeat)))
    return per_pass


class RawRebuild:
    """Raw zfec for the stripes a replacement of `node` rebuilds: decode its data stripes from the other blocks,
    encode its parity stripes; random bytes of the layout's geometry."""

    def __init__(self, layout, node: int) -> None:
        import zfec

        k, n, chunk = layout.k, layout.n, layout.chunk_size
        data_t, par_t = layout.data_stripes(node), layout.parity_stripes(node)
        count = max(len(data_t), len(par_t))
        stripes = stripes_of(random_buffer(count * k * chunk), k, chunk, count)
        self.k, self.n, self.enc, self.dec = k, n, zfec.Encoder(k, n), zfec.Decoder(k, n)
        self.inputs = []
        for i, t in enumerate(data_t):
            lost = layout.block_number(t, node)
            (par,) = self.enc.encode(stripes[i], (k,))
            other = [b for b in range(k) if b != lost]
            self.inputs.append((tuple(stripes[i][b] for b in other) + (par,), tuple(other) + (k,)))
        self.parity_inputs = stripes[:len(par_t)]
        self.info = {"data_bytes": layout.sizes[node], "parity_bytes": len(par_t) * chunk,
                     "data_stripes": len(data_t), "parity_stripes": len(par_t)}

    def time(self) -> tuple[float, float]:
        """(decode s, encode s) of one pass."""
        start = time.perf_counter()
        for blocks, nums in self.inputs:
            self.dec.decode(blocks, nums)
        return time.perf_counter() - start, raw_encode_s(self.parity_inputs, self.k, self.n)


def raw_rebuild_s(share: dict, node_bytes: int, repeat: int) -> dict:
    """Best of `repeat` RawRebuild passes for member 2 of the share's layout holding `node_bytes`."""
    from ftmem.erasure import StripeLayout

    raw = RawRebuild(StripeLayout(3, 1, share["chunk"], share["sizes"][:2] + (node_bytes,)), 2)
    passes = [raw.time() for _ in range(repeat)]
    return {"decode_s": min(d for d, _ in passes), "encode_s": min(e for _, e in passes), **raw.info}


def run_smp_path(endpoints: dict[int, str], secret: str, job: str, nice: int, repeat: int,
                 timeout: float) -> dict:
    """`smp_path` in a child process that runs as an SMP does: a session (autogroup) of its own at the nice the
    job's SMPs have now, and glibc keeping freed frames (`keep_freed_memory`). Measured from this process it
    would be neither: at nice 0 it would take the cores from the niced SMPs serving it, and each 16 MiB reply
    would land in fresh pages."""
    spec = json.dumps({"endpoints": endpoints, "job": job, "nice": nice, "repeat": repeat, "timeout": timeout})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--smp-path", spec], capture_output=True,
                          text=True, env={**os.environ, "FTMEM_SECRET": secret}, start_new_session=True,
                          timeout=timeout + 60 * repeat)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("SMPPATH ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"smp path (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(line[len("SMPPATH "):])


def smp_path_child(spec: dict) -> int:
    from ftmem.smp.process import Priority, keep_freed_memory

    keep_freed_memory()
    if not Priority().set(spec["nice"]):
        say(f"smp path: could not move to nice {spec['nice']}; measuring at nice 0")
    out = smp_path({int(m): e for m, e in spec["endpoints"].items()}, os.environ["FTMEM_SECRET"].encode(),
                   spec["job"], spec["repeat"], spec["timeout"])
    print("SMPPATH " + json.dumps(out), flush=True)
    return 0


def smp_path(endpoints: dict[int, str], secret: bytes, job: str, repeat: int, timeout: float) -> dict:
    """ftmem's own `encode_round` and `rebuild_node` against the job's live SMPs (workers paused), each right
    after raw zfec on the same geometry: one member's encode path, and node 2's rebuild from nodes 0 and 1.

    In the job all three SMPs encode at once, and here they share 2 cores with each other and with the peers
    serving them; on a cluster each has its own node's cores. This measures one SMP's path as it would run
    there: real requests to real SMPs over TCP, Poly1305 MACs on both ends, the pipelined coders, parity
    written to shared memory. The SMPs only serve (reads of their committed step). Each repetition is a pair
    (raw zfec, then the path on as many stripes; members take turns), so the ratio of a pair compares two
    moments a second apart on a machine whose speed drifts. The rebuilt payload is checked against its
    commit-time checksums (bit-exact or the bench fails)."""
    import mmap

    from ftmem.recovery.rebuild import newest_protected, rebuild_node, verify
    from ftmem.smp.layout import HEADER_SIZE, Header
    from ftmem.smp.nodedata import NodeData, Part
    from ftmem.smp.parity import ParityStore
    from ftmem.smp.peer import Links, PeerCodec
    from ftmem.smp.protect import encode_round

    members = (0, 1, 2)
    links = Links(PeerCodec(secret, job, 0))
    parity = ParityStore(f"ftmem-bench-path-{uuid.uuid4().hex[:8]}-")
    out: dict = {"encode": [], "rebuild": []}

    def link_to(lost: int | None):
        return lambda m: None if m == lost else links.to(m, endpoints[m])
    try:
        meta = newest_protected(members, 2, link_to(2), timeout)
        if meta is None:
            raise BenchError("smp path: no protected step to encode and rebuild")
        layout = meta.layout
        k, chunk = layout.k, layout.chunk_size
        count = max(len(layout.parity_stripes(m)) for m in range(3))
        stripes = stripes_of(random_buffer(count * k * chunk), k, chunk, count)
        raw_rb = RawRebuild(layout, 2)
        out.update(step=meta.step, rebuild_bytes=layout.sizes[2] + layout.parity_bytes(2), **raw_rb.info)
        manifest = meta.manifests[2]
        maps = [mmap.mmap(-1, HEADER_SIZE + length) for _, length, _ in manifest]
        data = NodeData([Part(rank, SimpleNamespace(segment=SimpleNamespace(buf=mm)), length)
                         for (rank, length, _), mm in zip(manifest, maps)])
        headers = {rank: Header.unpack(h) for rank, _, h in manifest}
        raw_encode_s(stripes[:2], k, 3)
        for rep in range(repeat):
            me = members[rep % 3]
            mine = len(layout.parity_stripes(me))
            raw = raw_encode_s(stripes[:mine], k, 3)
            start = time.perf_counter()
            encode_round(meta.step, me, members, meta.f, link_to(None), parity, timeout, lambda: False)
            out["encode"].append({"raw": raw, "path": time.perf_counter() - start, "bytes": mine * k * chunk})
            raw = sum(raw_rb.time())
            start = time.perf_counter()
            rebuild_node(meta, 2, data, parity, link_to(2), timeout)
            out["rebuild"].append({"raw": raw, "path": time.perf_counter() - start})
            if (bad := verify(data, headers)):
                raise BenchError(f"smp path: the rebuilt data fails its checksums: {bad}")
        for mm in maps:
            mm.close()
    finally:
        links.close()
        parity.close(unlink_all=True)
    return out


# ------------------------------------------------------------------------------------------------ reporting


def fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}s"


def table(title: str, rows: list[tuple], head: tuple) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"\n{title}")
    print("  " + "  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# -------------------------------------------------------------------------------------------------- workers


def worker(argv: list[str]) -> int:
    """`--worker save|load|job DIR --dim D --layers L`: the DCP baseline, inside train_gpt's own Trainer."""
    t_proc = time.time()
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load", "job"])
    p.add_argument("dir")
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--layers", type=int, required=True)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    sys.path.insert(0, str(TRAIN.parent))
    import train_gpt as tg

    t_import = time.perf_counter() - t0
    targs = tg.parse_args(["--dim", str(a.dim), "--layers", str(a.layers), "--no-ftmem", "--steps", "10"])
    tg.configure_torch()
    rank, world = tg.init_distributed()
    t1 = time.perf_counter()
    trainer = tg.Trainer(targs, rank, world)
    t_build = time.perf_counter() - t1
    out: dict = {"import_s": t_import, "build_s": t_build}
    if a.mode == "save":
        trainer.step()  # AdamW state exists and is non-trivial
        msd, osd = get_state_dict(trainer.model, trainer.optimizer)
        start = time.perf_counter()
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=a.dir)
        out["save_s"] = time.perf_counter() - start
        out["hash"] = tg.state_hash(trainer.model, trainer.optimizer)
    else:
        trainer.optimizer.zero_grad()
        start = time.perf_counter()
        msd, osd = get_state_dict(trainer.model, trainer.optimizer)  # initializes empty AdamW state to load into
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=a.dir)
        set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if world > 1:
            dist.barrier()
        out["load_s"] = time.perf_counter() - start
        out["since_process_start_s"] = time.time() - t_proc
        if a.mode == "load":
            out["hash"] = tg.state_hash(trainer.model, trainer.optimizer)
    if rank == 0:
        print("DCP " + json.dumps(out), flush=True)
    if a.mode == "job":
        loss = trainer.step()
        mean = trainer.mean_loss(loss)
        if rank == 0:
            print(f"step 0 loss {mean:.6f}", flush=True)
    dist.barrier()
    del trainer
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and repetitions, a smaller model (~108 MB per rank), no fresh-process dcp.load, "
                        "a shorter raw-zfec-while-training window (< 2 min on a quiet 2-core machine)")
    p.add_argument("--dim", type=int, default=None, help="train_gpt --dim (default 384; --quick 352)")
    p.add_argument("--layers", type=int, default=None, help="train_gpt --layers (default 8: ~171 MB per rank; "
                                                             "--quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="steps skipped before the step-time window")
    p.add_argument("--measure", type=int, default=None, help="steps in the step-time / round window")
    p.add_argument("--post-resume-wait", type=float, default=None, metavar="S",
                   help="how long to wait after the resume for the first EC round to end (default 15; --quick 5)")
    p.add_argument("--check-hash", action="store_true",
                   help="run the EC job to its end and compare its final hash with the plain job's (longer)")
    p.add_argument("--timeout", type=float, default=240.0, help="bound on every wait (seconds)")
    p.add_argument("--rdzv-conf", default=None,
                   help="torchrun --rdzv-conf of the EC job, e.g. keep_alive_interval=1,keep_alive_max_attempt=3: "
                        "the survivors' re-rendezvous waits for the dead node's keep-alive to expire (torchrun's "
                        "default 5 s x 3), which a replacement that starts at once runs into")
    p.add_argument("--json", default=None, metavar="PATH", help="write every raw sample here")
    p.add_argument("--keep", action="store_true", help="keep the logs (work dir) after a successful run")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--smp-path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    if args.smp_path is not None:
        return smp_path_child(json.loads(args.smp_path))

    quick = args.quick
    args.dim = args.dim or (352 if quick else 384)
    args.layers = args.layers or (6 if quick else 8)
    plan = SimpleNamespace(warmup=args.warmup or (2 if quick else 3), measure=args.measure or (4 if quick else 8),
                           loaded_s=1.0 if quick else 4.0, after=1 if quick else 3, repeat=2 if quick else 3,
                           before_kill=1 if quick else 2, dcp_fresh=not quick,
                           post_resume_wait=args.post_resume_wait if args.post_resume_wait is not None
                           else 5.0 if quick else 15.0)
    hook_steps = plan.warmup + plan.measure
    # Without --check-hash the bench ends the EC job itself a few steps after the resume.
    plan.ec_steps = hook_steps + 12 + plan.after if args.check_hash else hook_steps + 200
    plain_steps = plan.ec_steps if args.check_hash else hook_steps

    def layout_for(group_bytes: int) -> dict:
        from ftmem.erasure import StripeLayout, choose_chunk_size

        size = -(-group_bytes // 3)
        sizes = (size, size, group_bytes - 2 * size)
        k = 2
        chunk = choose_chunk_size(max(sizes), k)
        lay = StripeLayout(3, 1, chunk, sizes)
        inputs = [sum(lay.data_chunk(t, d)[1] for d in lay.data_members(t)) for t in lay.parity_stripes(0)]
        return {"k": k, "chunk": chunk, "sizes": sizes, "node_stripes": len(inputs), "node_input": sum(inputs),
                "stripes": -(-group_bytes // (k * chunk))}
    plan.layout_for = layout_for

    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = shlex.join([exe, os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]])
    sess = Session(args.keep)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    t_begin = time.time()
    result: dict = {"command": command, "phases": []}

    def phase(name: str) -> None:
        result["phases"].append((name, time.time() - t_begin, loadavg()))
        say(f"{name} (load average {loadavg()})")
    try:
        say(f"work dir {sess.work}")
        phase("plain torchrun job")
        plain = run_torchrun(sess, args, hook=False, steps=plain_steps)
        phase("torchrun job with the hook")
        hook = run_torchrun(sess, args, hook=True, steps=hook_steps)
        phase("EC job")
        ec = run_ec_job(sess, args, plan)
        phase("DCP baseline")
        dcp_res = run_dcp(sess, args, plan.dcp_fresh)
        phase("raw zfec / SMP pipeline pieces, no job running")
        share = ec["share"]
        group = share["stripes"] * share["k"] * share["chunk"]
        buf = random_buffer(group)
        stripes = stripes_of(buf, share["k"], share["chunk"], share["stripes"])
        raw_encode_s(stripes[:4], share["k"], 3)
        idle = []
        for _ in range(plan.repeat):
            c0 = time.process_time()
            w = raw_encode_s(stripes, share["k"], 3)
            idle.append((w, time.process_time() - c0))
        del stripes, buf
        node_bytes = int(ec["rebuilding"][3]) if ec["rebuilding"] else share["sizes"][2]
        rebuild_raw = raw_rebuild_s(share, node_bytes, plan.repeat)
        pieces = pipeline_breakdown(share, plan.repeat)
        phase("done")
        result.update(plain=plain, hook=hook, ec=ec, dcp=dcp_res, raw_idle=idle, raw_rebuild=rebuild_raw,
                      pieces=pieces, share=share)
        report(result, plan, args, time.time() - t_begin)
        alive, segs = sess.leftovers()
        if alive or segs:
            print(f"\nPROBLEM: left behind by the jobs: SMP pids {alive}, /dev/shm segments {segs} (removed now)")
        else:
            print("\nclean: every SMP of the bench's jobs exited and no /dev/shm segment of them is left")
    except BaseException:
        sess.failed = True
        raise
    finally:
        sess.cleanup()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=repr)
    return 0


def report(r: dict, plan: SimpleNamespace, args: argparse.Namespace, elapsed: float) -> None:
    ec, plain, hook, share = r["ec"], r["plain"], r["hook"], r["share"]
    W, last = plan.warmup, plan.warmup + plan.measure - 1
    k, chunk = share["k"], share["chunk"]
    node_in = share["node_input"]  # one SMP's encode input per round
    group = sum(share["sizes"])
    print(f"\n# bench_protect: {r['command']}")
    print(f"model: train_gpt --dim {args.dim} --layers {args.layers}, 3 ranks (1 per simulated node); "
          f"{os.cpu_count()} cores shared by everything; whole run {elapsed:.0f}s")
    print("phases (start s, load average 1/5/15 min): " + "; ".join(f"{n} @{t:.0f}s [{la}]" for n, t, la in r["phases"]))
    print(f"EC job:    {ec['cmd']}   (I = 0, 1, 2; node 0 first)")
    print(f"plain job: {plain['cmd']}")
    print(f"hook job:  FTMEM_JOB_ID=<unique> {hook['cmd']}")

    # ---- 1. encode
    print(f"\n1. ENCODE: last_round_bytes = {group / 1e6:.1f} MB (the group's data, 3 x {group / 3e6:.1f} MB); "
          f"k=2 n=3 f=1, chunk {chunk / 2**20:.2f} MiB; each SMP encodes the {share['node_stripes']} stripes it "
          f"holds parity for: {node_in / 1e6:.1f} MB of input per round")
    has_paused = "paused_step" in ec
    # the paused window's last round only (the newest step it protected): an earlier one, of a step committed as
    # the workers were let through, may have overlapped their step
    newest = max((x.get("last_round_step") or -1 for x in ec.get("paused_rounds", [])), default=None)
    paused = [x["last_round_s"] for x in ec["paused_rounds"] if x.get("last_round_step") == newest] if has_paused else []
    training = [x["last_round_s"] for x in ec["rounds"]]
    raw_idle_share = min(w for w, _ in r["raw_idle"]) * node_in / (share["stripes"] * k * chunk)
    rows = []

    def smp_row(label: str, xs: list[float]) -> None:
        if xs:
            rows.append((label, len(xs), fmt_s(med(xs)), f"{node_in / med(xs) / 1e9:.3f}",
                         f"{group / med(xs) / 1e9:.3f}", ""))
        else:
            rows.append((label, 0, "n/a", "", "", ""))

    def raw_row(label: str, n: int, t: float, ref: list[float]) -> None:
        rows.append((label, n, fmt_s(t), f"{node_in / t / 1e9:.3f}", "", f"{t / med(ref):.1%}" if ref else ""))
    if has_paused:
        raw_p = min(w for w, _ in ec["paused_raw"])
        raw_p_cpu = min(c for _, c in ec["paused_raw"])
        smp_row(f"SMP round, workers paused (step {newest}; 1 per SMP)", paused)
        raw_row("raw zfec, same moment (workers paused), best", len(ec["paused_raw"]), raw_p, paused)
    smp_row("SMP round while training (every round seen in the window)", training)
    if ec["loaded"]:
        raw_row("raw zfec while the job trains, median", len(ec["loaded"]), med([w for w, _ in ec["loaded"]]),
                training)
    raw_row("raw zfec, no job running, best", len(r["raw_idle"]), raw_idle_share, paused)
    table("   one SMP's encode round vs raw zfec.Encoder(2, 3).encode of the same bytes in chunk-sized blocks "
          "(target: raw/SMP >= 80%)", rows, ("", "n", "time", "GB/s/SMP", "GB/s group", "raw/SMP"))
    print("   GB/s group = last_round_bytes / last_round_s as `status` gives it; the 3 SMPs encode 1/3 each, in "
          "parallel, so compare per SMP (GB/s/SMP = this SMP's input / its round time).")
    if paused:
        print(f"   the group's round as a whole, workers paused: {med(paused):.2f}s for the 3 shares "
              f"({3 * node_in / 1e6:.0f} MB of input) by 3 SMPs sharing {os.cpu_count()} cores, vs raw zfec of the "
              f"same 3 shares on one core {3 * raw_p:.2f}s: {3 * raw_p / med(paused):.1%}")
    if has_paused:
        a, b = ec["paused_ec"]
        d_ok = {i: b[i].get("rounds_ok", 0) - a[i].get("rounds_ok", 0) for i in a}
        d_fail = {i: b[i].get("rounds_failed", 0) - a[i].get("rounds_failed", 0) for i in a}
        rounds_paused = d_ok[0] + d_fail[0]
        if rounds_paused:
            cpu_round = ec["paused_cpu"] / rounds_paused
            print(f"   CPU, workers paused: the 3 SMPs used {ec['paused_cpu']:.2f} CPU-s for {rounds_paused} round(s) "
                  f"(ok {d_ok[0]}, failed {d_fail[0]}) = {cpu_round:.2f} CPU-s per round (all their work: serving "
                  f"reads, transfer, MACs, encode, status polls) vs raw zfec {3 * raw_p_cpu:.2f} CPU-s for the same "
                  f"3 shares: {3 * raw_p_cpu / cpu_round:.1%}")
        else:
            print(f"   PROBLEM: no EC round ended in the paused window (step {ec['paused_step']} committed, "
                  f"workers stopped, {ec['paused_wall']:.1f}s)")
    else:
        print(f"   no paused-window measurement: no EC round ended within {ec['post_resume_waited']:.0f}s of the "
              f"resume (see 4.)")
    if "path" in ec:
        pth = ec["path"]
        rows, enc_bytes = [], med([p["bytes"] for p in pth["encode"]])
        for label, pairs, nbytes in (
                ("encode_round: a member's parity (%.1f MB of input; members in turn)" % (enc_bytes / 1e6),
                 pth["encode"], enc_bytes),
                ("rebuild_node: node 2 from nodes 0, 1 (%.1f MB data + parity; raw: decode + encode)"
                 % (pth["rebuild_bytes"] / 1e6), pth["rebuild"], pth["rebuild_bytes"])):
            path_t, raw_t = med([p["path"] for p in pairs]), med([p["raw"] for p in pairs])
            rows.append((label, len(pairs), fmt_s(path_t), fmt_s(raw_t), f"{nbytes / path_t / 1e9:.3f}",
                         f"{med([p['raw'] / p['path'] for p in pairs]):.1%}",
                         f"{min(p['raw'] for p in pairs) / min(p['path'] for p in pairs):.1%}"))
        table(f"   the SMP path alone: ftmem's encode_round / rebuild_node in a process of their own run as an SMP "
              f"(own session, nice {ec['path_nice']}), against the 3 live SMPs (workers paused, SMPs only serving; "
              f"step {pth['step']}; rebuilt data verified against its checksums), each right after raw zfec on the "
              f"same stripes; target: raw/path >= 80%", rows,
              ("", "pairs", "path", "raw", "path GB/s", "raw/path: median of pairs", "best / best"))
    w0, w1 = ec["status_w0"], ec["status_w1"]
    started = {i: sum((w1[i] or {}).get("ec_stats", {}).get(f, 0) - (w0[i] or {}).get("ec_stats", {}).get(f, 0)
                      for f in ("rounds_ok", "rounds_failed")) for i in range(3)}
    okw = {i: (w1[i] or {}).get("ec_stats", {}).get("rounds_ok", 0) - (w0[i] or {}).get("ec_stats", {}).get("rounds_ok", 0)
           for i in range(3)}
    print(f"   while training ({plan.measure} steps, {ec['window_s']:.1f}s): {started[0]} rounds ended, {okw[0]} ok; "
          f"the SMPs used {ec['window_cpu']:.1f} CPU-s ({ec['window_cpu'] / ec['window_s']:.2f} cores of 2)")
    sb = ec["status_before_kill"]
    cells = []
    for i in range(3):
        s = sb[i] or {}
        e = s.get("ec_stats") or {}
        cells.append(f"node {i}: committed {s.get('committed')} protected {s.get('protected')} ok "
                     f"{e.get('rounds_ok')} failed {e.get('rounds_failed')} lag_steps {e.get('lag_steps')}")
    print("   at the kill: " + "; ".join(cells))
    print(f"   rounds that failed before the kill (node 0's SMP log, by reason): {ec['fail_reasons'] or 'none'}")

    pieces = r["pieces"]
    total = sum(w for w, _ in pieces.values())
    total_cpu = sum(c for _, c in pieces.values())
    rows = [(name, fmt_s(w), fmt_s(c), f"{node_in / c / 1e9:.2f}" if c > 0 else "", f"{c / total_cpu:.0%}")
            for name, (w, c) in pieces.items()]
    rows.append(("sum (a round does these one after the other)", fmt_s(total), fmt_s(total_cpu),
                 f"{node_in / total_cpu / 1e9:.2f}", "100%"))
    table(f"   where one SMP's round goes: its {node_in / 1e6:.0f} MB through each step of the path, in this "
          f"process, no job running (median of {plan.repeat})", rows, ("step", "wall", "CPU", "GB/CPU-s", "CPU share"))
    zf = pieces.get("zfec encode (ftmem encode_parity)", (0, 0))[1]
    cores = os.cpu_count() or 1
    stages = [c for name, (_, c) in pieces.items() if not name.startswith("serve:")]
    print(f"   bounds on path/raw from these pieces: every piece on one core {zf / total_cpu:.1%}; on this machine's "
          f"{cores} cores, the serving peers on the same cores, at best {min(1.0, cores * zf / total_cpu):.1%}; on "
          f"a cluster (peers on their own nodes, the encoder's stages in parallel: the slowest stage) "
          f"{min(1.0, zf / max(stages)):.1%}"
          + (f". The paused SMP round (3 SMPs encoding at once) took {med(paused):.2f}s wall = "
             f"{med(paused) / total:.1f}x the pieces' wall sum" if paused else ""))

    # ---- 2. rebuild
    rb, ev = r["raw_rebuild"], ec["smp_events"]
    print("\n2. REBUILD of node 2 (the replacement's SMP, from nodes 0 and 1)")
    if ec["rebuilt"]:
        rebuild_s = float(ec["rebuilt"][2])
        st_rep = ec["status_replacement"] or {}
        rs_status = (st_rep.get("ec_stats") or {}).get("rebuild_s")
        nbytes = rb["data_bytes"] + rb["parity_bytes"]
        raw_t = rb["decode_s"] + rb["encode_s"]
        rows = [
            ("SMP rebuild (log line; status rebuild_s %s)" % (f"{rs_status:.2f}s" if rs_status else "n/a"),
             fmt_s(rebuild_s), f"{nbytes / rebuild_s / 1e9:.3f}", ""),
            ("raw zfec: decode its %d data stripes + encode its %d parity stripes, no job running"
             % (rb["data_stripes"], rb["parity_stripes"]), fmt_s(raw_t), f"{nbytes / raw_t / 1e9:.3f}",
             f"{raw_t / rebuild_s:.1%}"),
            ("  raw decode alone (data bytes / s)", fmt_s(rb["decode_s"]),
             f"{rb['data_bytes'] / rb['decode_s'] / 1e9:.3f}", ""),
        ]
        table(f"   step {ec['rebuilt'][1]}: {rb['data_bytes'] / 1e6:.1f} MB of data + {rb['parity_bytes'] / 1e6:.1f} MB "
              f"of parity", rows, ("", "time", "GB/s", "raw/SMP"))
    else:
        print("   PROBLEM: the replacement's SMP log has no 'rebuilt' line")

    # ---- 3. step time
    pa, ha, ea = (intervals(x, W, last) for x in (plain["arrivals"], hook["arrivals"], ec["arrivals"]))
    base = med(pa)
    rows = []
    for name, xs in (("torchrun --standalone, --no-ftmem", pa), ("torchrun --standalone + hook (1 local SMP, no EC)", ha),
                     ("3 x ftmem-run, EC k=2 n=3 f=1", ea)):
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [float("nan")] * 3
        rows.append((name, len(xs), f"{med(xs):.3f}s", f"{q[0]:.3f}-{q[2]:.3f}s", f"{med(xs) / base:.3f}"))
    table(f"3. STEP TIME, snapshot every step (steps {W}..{last}: arrival of 'step N' - arrival of 'step N-1' on "
          f"rank 0's output)", rows, ("", "steps", "median", "IQR", "vs plain"))
    print(f"   EC vs hook without EC: {med(ea) / med(ha):.3f}; process start to step 0: plain {plain['startup_s']:.1f}s, "
          f"hook {hook['startup_s']:.1f}s")

    # ---- 4. resume
    d = r["dcp"]
    t0 = ec["t_rep"]
    rep_restore = next((v for name, v in ec["restored"].items() if "replacement" in name), None)
    redone = ec["kill_step"] + 1 - ec["resumed_at"]
    print(f"\n4. TIME TO RESUME after losing node 2 (killed after step {ec['kill_step']}; resumed at step "
          f"{ec['resumed_at']}: {redone} step(s) to redo)")
    rows = [(f"(kill_node itself: SIGKILL of {3} processes + unlink, before the replacement starts)",
             f"{ec['t_killed'] - ec['t_kill']:.2f}s")]
    for label, key in (("replacement SMP serving (launcher started it)", "serving"),
                       ("its peer endpoint (store reached)", "peer"),
                       ("rebuild started (probe done)", "rebuild_start"), ("rebuild done", "rebuilt")):
        if ev.get(key):
            rows.append((f"  -> {label}", f"{ev[key] - t0:.2f}s"))
    for name, t in sorted(ec["workers_started"].items(), key=lambda kv: kv[1]):
        cpu = ec.get("worker_cpu_at_resume", {}).get(name)
        rows.append((f"  -> {name}: new worker process created" +
                     (f" (it had used {cpu:.1f} CPU-s when rank 0 printed resumed-at-step)" if cpu is not None else ""),
                     f"{t - t0:.2f}s"))
    if rep_restore:
        rows.append((f"  -> replacement's rank {rep_restore['rank']} restored ({rep_restore['bytes'] / 1e6:.1f} MB "
                     f"from {rep_restore['source']}; {rep_restore['seconds']:.2f}s in-process)",
                     f"{rep_restore['t'] - t0:.2f}s"))
    rows.append(("  -> rank 0 prints resumed-at-step (every rank restored)", f"{ec['t_resumed'] - t0:.2f}s"))
    rows.append((f"  -> first step after the resume (step {ec['resumed_at']}) printed", f"{ec['t_first'] - t0:.2f}s"))
    for name, v in sorted(ec["restored"].items()):
        if "replacement" not in name:
            rows.append((f"  ({name}: rank {v['rank']} restored from {v['source']}, {v['seconds']:.2f}s in-process)",
                         ""))
    table("   ftmem, from the replacement node's start (Popen of its ftmem-run)", rows, ("", ""))
    rows = [("dcp.save in a process (model + AdamW state; %.1f MB on disk; no fsync)" % (d["bytes"] / 1e6),
             fmt_s(d["save"]["save_s"]))]
    if d.get("load"):
        rows += [("dcp.load + set_state_dict in a fresh process (in-process time)", fmt_s(d["load"]["load_s"])),
                 ("  that process: start -> loaded (interpreter, imports %.2fs, build model %.2fs, load)"
                  % (d["load"]["import_s"], d["load"]["build_s"]), fmt_s(d["load"]["process_s"]))]
    rows += [("fresh 3-rank torchrun job: start -> every rank loaded (rank 0: dcp.load %.2fs in-process)"
              % d["job"]["load_s"], fmt_s(d["job"]["to_loaded_s"])),
             ("  -> its first step printed", fmt_s(d["job"]["to_first_step_s"]))]
    table(f"   DCP restart from local disk (page cache warm){'' if d.get('hash_ok', True) else ' LOADED STATE DIFFERS'}",
          rows, ("", ""))
    ref = d["load"]["load_s"] if d.get("load") else d["job"]["load_s"]
    if rep_restore:
        print(f"   in-process load: ftmem restore {rep_restore['seconds']:.2f}s vs dcp.load {ref:.2f}s "
              f"({rep_restore['seconds'] / ref:.2f}x)")
    print(f"   start -> resumed: ftmem replacement {ec['t_resumed'] - t0:.1f}s vs fresh DCP job "
          f"{d['job']['to_loaded_s']:.1f}s ({(ec['t_resumed'] - t0) / d['job']['to_loaded_s']:.2f}x); -> first step: "
          f"{ec['t_first'] - t0:.1f}s vs {d['job']['to_first_step_s']:.1f}s")
    print("   DCP excludes: writing checkpoints during training, noticing the failure, cold page cache, redoing the "
          "steps since the checkpoint. ftmem includes: its launcher start, the SMP's probe and rebuild, the "
          f"survivors' elastic restart and rendezvous, and it must redo {redone} step(s).")
    fr = ec.get("first_round_after_resume")
    if fr:
        print(f"   protection after the resume: the first EC round ended {fr['t'] - ec['t_resumed']:.1f}s after "
              f"resumed-at-step (leader's committed step then {fr['committed']}, protected {fr['protected']})")
    else:
        print(f"   PROBLEM: no EC round ended within {ec['post_resume_waited']:.0f}s after the resume (the job "
              f"reached step {ec['newest_step_after_resume']}; the group stays protected at the old step). A round "
              f"the leader started before the kill ends only at its deadline (--ftmem-timeout, default 300s; "
              f"cluster.py _lead), and no other starts meanwhile.")
    notes = [line.split(" ftmem smp ", 1)[-1][:160] for line in ec.get("smp0_after_kill", [])]
    if notes:
        print("   node 0's SMP log after the kill:\n     " + "\n     ".join(notes[:12]))
    if args.check_hash:
        golden, got = plain.get("hash"), ec.get("hash")
        print(f"\nfinal hash: plain torchrun {golden}, EC job with node 2 lost and rebuilt {got}: "
              f"{'IDENTICAL' if golden and golden == got else 'DIFFERENT (PROBLEM)'}")


if __name__ == "__main__":
    sys.exit(main())
