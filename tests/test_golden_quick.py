"""End to end: the hook changes no result, and a rank crash mid-copy is recovered bit-identically."""

from conftest import final_hash

STEPS = ["--steps", "24"]


def test_rank_crash_mid_copy_is_recovered_bit_identically(cluster):
    base = cluster.ftmem_run(["--nproc-per-node", "2"], [*STEPS, "--no-ftmem"], name="baseline")
    golden = final_hash(cluster.wait(base))
    run = cluster.ftmem_run(["--nproc-per-node", "2", "--max-restarts", "2"], STEPS, name="faulty",
                            FTMEM_CRASH_AT="mid_copy@9@1", FTMEM_CRASH_MARKER=str(cluster.tmp / "crash"))
    out = cluster.wait(run)
    assert "restored step 8 from local memory" in out, cluster.logs()
    assert final_hash(out) == golden
