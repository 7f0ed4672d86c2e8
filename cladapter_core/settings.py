"""Deployment settings read from the environment, each named in one place.

IMAGE: the container image every pipeline step runs in (the image built from
infra/docker/Dockerfile). Read when the pipeline is compiled; set ``CLADAPTER_IMAGE``
to use another registry or tag (and `images:` in the k8s overlay to match).
"""
from __future__ import annotations

import os

IMAGE = os.environ.get("CLADAPTER_IMAGE", "ghcr.io/cladapter/cladapter:0.1.0")
