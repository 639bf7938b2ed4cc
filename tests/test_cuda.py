"""The CUDA copy path: side-stream device-to-host copies into SMP memory registered with cudaHostRegister.

Runs only where a GPU is present (CI has none); it exercises the same hook end to end in one process.
"""


import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCRIPT = r'''
import hashlib, os, sys, torch
from ftmem import Snapshotter
torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Dropout(0.1),
                            torch.nn.Linear(512, 256)).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
snap = Snapshotter(model, opt)
start = snap.restore()
crash_at = int(sys.argv[1])
for step in range(start, 30):
    x = torch.randn(64, 256, device="cuda")
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    snap.snapshot(step)
    if step == crash_at:
        snap.wait()
        os._exit(3)
snap.close()
h = hashlib.sha256()
for t in model.state_dict().values():
    h.update(t.cpu().numpy().tobytes())
for state in opt.state.values():
    for k in sorted(state):
        h.update(state[k].cpu().numpy().tobytes())
print("final-hash", h.hexdigest(), "start", start)
'''


def test_cuda_snapshot_restore_is_bit_identical(cluster):
    path = cluster.tmp / "cuda_train.py"
    path.write_text(SCRIPT)
    golden = cluster.wait(cluster.python([str(path), "-1"], "golden"))
    crashed = cluster.python([str(path), "12"], "crashed", FTMEM_KEEP="1")
    cluster.wait(crashed)
    assert crashed.returncode == 3, cluster.logs()
    resumed = cluster.wait(cluster.python([str(path), "-1"], "resumed"))
    assert "start 13" in resumed, cluster.logs()
    assert resumed.split("final-hash ")[1].split()[0] == golden.split("final-hash ")[1].split()[0]
