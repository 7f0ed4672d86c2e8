"""benchmarks/gpu_check.py in its tiny mode: the one command meant for a GPU machine runs
end to end on the CPU and writes every figure it promises."""
import json
import subprocess
import sys

from helpers import REPO


def test_gpu_check_tiny_mode_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--json", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for figure in ("stage-2 training step, images/s", "MFU", "stage 1 cached / uncached", "cache build",
                   "adapter op einsum / reference", "inference, images/s", "loader, decoding in"):
        assert figure in proc.stdout, figure
    res = json.loads(out.read_text())
    assert res["tiny"] is True and res["device"]["device"] == "cpu"
    r = res["results"]
    assert r["train_step"]["images_per_s"] > 0 and r["train_step"]["tflop_per_step"] > 0
    assert r["train_step"]["mfu"] is None  # no GPU peak on a CPU
    assert r["stage1_cache"]["runs"]["cached"]["cache"]["built"] is True
    assert r["stage1_cache"]["runs"]["uncached"]["cache"] is None
    assert r["stage1_cache"]["cache_build_images_per_s"] > 0
    assert r["adapter_op"]["max_rel_diff"] < 1e-5 and r["adapter_op"]["einsum_peak_bytes"] > 0
    assert r["inference"]["images_per_s"] > 0
    for how in ("workers", "device"):
        assert r["loader"][how]["images"] > 0 and r["loader"][how]["loader_over_model"] > 0
    assert set(res["seconds"]) == {"train_step", "adapter_op", "inference", "stage1_cache", "loader"}
