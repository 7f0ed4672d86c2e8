"""The install's weights mirror: `model.pretrained` without internet.

A checkpoint the test makes (random weights: nothing can be downloaded here) goes into a
loopback S3 mirror with `cladapter mirror-weights` as a process; a backbone built with
`pretrained: true` and $CLADAPTER_WEIGHTS_MIRROR set then holds exactly those weights,
with the hub switched off, so a download attempt would fail. The same path a cluster
without internet takes.
"""
from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import save_file

from cladapter_core.errors import ModelError
from cladapter_core.model.backbones import Backbone
from helpers import BIN, child_env

NAME = "test_vit.r160_in1k"  # timm's tiny test ViT, with a pretrained tag as real names have


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of the backbone as a user would have it: its state dict, other weights
    than a fresh random model's."""
    torch.manual_seed(123)
    state = Backbone(NAME, pretrained=False).model.state_dict()
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_pretrained_reads_the_mirror_and_never_downloads(checkpoint, bucket, monkeypatch):
    path, state = checkpoint
    mirror = f"s3://{bucket}/weights"
    proc = subprocess.run([str(BIN / "cladapter"), "mirror-weights", NAME, "--to", mirror, "--from-file", str(path)],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{mirror}/{NAME}.safetensors" in proc.stdout
    monkeypatch.setenv("CLADAPTER_WEIGHTS_MIRROR", mirror)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)  # another random init: only the mirror's file can give `state`
    got = Backbone(NAME, pretrained=True).model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_backbone_missing_from_the_mirror_says_how_to_fill_it(bucket, monkeypatch):
    mirror = f"s3://{bucket}/weights"
    monkeypatch.setenv("CLADAPTER_WEIGHTS_MIRROR", mirror)
    with pytest.raises(ModelError, match=rf"{mirror}/{NAME}.safetensors does not exist.*"
                                         rf"cladapter mirror-weights {NAME} --to {mirror}"):
        Backbone(NAME, pretrained=True)


def test_explicit_weights_win_over_the_mirror(checkpoint, monkeypatch, tmp_path):
    """model.weights is what the user asked for: the mirror is not even read."""
    path, state = checkpoint
    monkeypatch.setenv("CLADAPTER_WEIGHTS_MIRROR", str(tmp_path / "no-such-mirror"))
    got = Backbone(NAME, pretrained=True, weights=str(path)).model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
