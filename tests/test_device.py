"""The device: a GPU that torch cannot use stops the run loudly unless the CPU is asked for.

The probe reads a /dev folder and a PATH, so these tests hand it a folder with a fake
device node and a fake `nvidia-smi` (a script printing what a real one prints), and say
what torch reports (`cuda=(available, reason)`), since this machine has no GPU."""
import os
import stat
import subprocess
import sys

import pytest
import torch

from cladapter_core import cli
from cladapter_core.distributed import (DEVICE_ENV, DeviceError, gpu_evidence, pick_device,
                                        requested_device)

TOO_OLD = ("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). "
           "Please update your GPU driver")


@pytest.fixture
def fake_gpu(tmp_path):
    """A /dev with nvidia0 + nvidiactl, and a PATH holding an nvidia-smi."""
    dev, bin_ = tmp_path / "dev", tmp_path / "bin"
    dev.mkdir()
    bin_.mkdir()
    for node in ("nvidia0", "nvidiactl", "null"):
        (dev / node).touch()
    smi = bin_ / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 470.57.02'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return dev, str(bin_)


@pytest.fixture
def no_device_env(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def test_the_probe_finds_device_nodes_and_nvidia_smi(fake_gpu, tmp_path):
    dev, path = fake_gpu
    found = gpu_evidence(dev, path)
    assert found == [f"device nodes {dev / 'nvidia0'}, {dev / 'nvidiactl'}", f"{path}/nvidia-smi"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gpu_evidence(empty, str(empty)) == []
    assert gpu_evidence(tmp_path / "missing", "") == []


def test_a_gpu_torch_cannot_use_stops_auto_and_says_why(fake_gpu, no_device_env):
    dev, path = fake_gpu
    with pytest.raises(DeviceError) as e:
        pick_device(None, dev_dir=dev, path=path, cuda=(False, TOO_OLD))
    text = str(e.value)
    assert "has an NVIDIA GPU" in text and str(dev / "nvidia0") in text and "nvidia-smi" in text
    assert "driver on your system is too old" in text                # torch's own reason
    assert "NVIDIA H100 80GB HBM3, 470.57.02" in text                # what nvidia-smi says
    assert "--device cpu" in text and "CLADAPTER_DEVICE=cpu" in text  # the way out
    # The CPU asked for: no question asked.
    assert pick_device("cpu", dev_dir=dev, path=path, cuda=(False, TOO_OLD)) == torch.device("cpu")
    no_device_env.setenv(DEVICE_ENV, "cpu")
    assert pick_device(None, dev_dir=dev, path=path, cuda=(False, TOO_OLD)) == torch.device("cpu")
    # GPUs hidden on purpose are a choice, not a broken driver.
    no_device_env.delenv(DEVICE_ENV)
    no_device_env.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pick_device(None, dev_dir=dev, path=path, cuda=(False, "no devices")) == torch.device("cpu")


def test_auto_takes_the_gpu_when_usable_and_the_cpu_where_there_is_none(fake_gpu, tmp_path,
                                                                        no_device_env):
    dev, path = fake_gpu
    assert pick_device(None, dev_dir=dev, path=path, cuda=(True, "")) == torch.device("cuda", 0)
    assert pick_device("cuda:1", dev_dir=dev, path=path, cuda=(True, "")) == torch.device("cuda", 1)
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert pick_device("auto", dev_dir=empty, path=str(empty),
                       cuda=(False, "CPU-only build")) == torch.device("cpu")


def test_cuda_asked_for_without_a_usable_gpu_and_bad_names_are_refused(fake_gpu, no_device_env):
    dev, path = fake_gpu
    with pytest.raises(DeviceError, match=r"--device cuda: torch cannot use a GPU here: .*too old"
                                          r".*found: device nodes"):
        pick_device("cuda", dev_dir=dev, path=path, cuda=(False, TOO_OLD))
    with pytest.raises(DeviceError, match=r"--device 'gpu': expected auto, cpu, cuda or cuda:N"):
        requested_device("gpu")
    no_device_env.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(DeviceError, match=r"\$CLADAPTER_DEVICE 'tpu'"):
        requested_device()


def test_this_machine_the_real_probe_agrees_with_torch(no_device_env):
    """Without fakes: where torch sees no GPU and nothing says there is one, the CPU."""
    if torch.cuda.is_available():
        assert pick_device().type == "cuda"
    elif not gpu_evidence():
        assert pick_device() == torch.device("cpu")


def test_every_training_and_inference_command_takes_device():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("train", "tune", "compare", "sweep", "evaluate", "predict", "demo"):
        assert "--device" in sub[command].format_help(), command


def test_the_command_stops_before_any_work_and_names_the_gpu(fake_gpu, tmp_path):
    """`cladapter train` on a PATH holding an nvidia-smi while torch sees no GPU (this
    machine): exit 2 with the message and no traceback, nothing written; --device cpu goes
    on (and fails later, on the missing data)."""
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: nothing to refuse")
    _, path = fake_gpu
    out = tmp_path / "stage1"
    env = {k: v for k, v in os.environ.items() if k not in (DEVICE_ENV, "CUDA_VISIBLE_DEVICES")}
    env["PATH"] = f"{path}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "cladapter_core.cli", "train", "--no-track", "--prepared",
           str(tmp_path / "none"), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "cladapter train: error: this machine has an NVIDIA GPU" in r.stderr
    assert "NVIDIA H100 80GB HBM3, 470.57.02" in r.stderr and "--device cpu" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = subprocess.run(cmd + ["--device", "cpu"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    assert r.returncode == 2 and "NVIDIA GPU" not in r.stderr and "manifest.csv" in r.stderr, r.stderr
