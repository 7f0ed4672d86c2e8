# syntax=docker/dockerfile:1.19@sha256:b6afd42430b15f2d2a4c5a02b919e98a525b785b1aaff16747d2f623364e39b6
# The MLflow tracking server of infra/k8s (Deployment cladapter-mlflow): Python, MLflow,
# psycopg2 and boto3, nothing of the training stack (no torch, no CUDA): a few hundred
# MB instead of the multi-GB GPU image; and the `cladapter-auth` server app (cladapter_auth/:
# MLflow's basic auth plus the promoter rule). Build from the repository root:
#   docker build -f infra/docker/mlflow.Dockerfile --build-context auth=cladapter_auth \
#     -t ghcr.io/cladapter/cladapter-mlflow:0.1.0 .
# (`auth`, a second build context, is the folder cladapter_auth/ alone: the main context
# stays two files, mlflow.Dockerfile.dockerignore.)
# The versions are the clients' (constraints.txt, the same file the platform image and
# the tests install from), so the server speaks the clients' MLflow.

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY constraints.txt infra/docker/mlflow-requirements.txt ./
# `auth` is the build context named on the command line, not a stage (hence DL3022).
# hadolint ignore=DL3022
COPY --from=auth pyproject.toml __init__.py rules.py ./cladapter_auth/
# cladapter_auth pulls in mlflow[auth] (Flask-WTF), pinned by constraints.txt as well.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -r mlflow-requirements.txt ./cladapter_auth \
    && /opt/venv/bin/mlflow --version \
    && /opt/venv/bin/python -c "import psycopg2, boto3, sqlalchemy, flask_wtf, cladapter_auth.rules; \
from importlib.metadata import entry_points as e; \
assert 'cladapter-auth' in e(group='mlflow.app').names, 'no cladapter-auth app'"

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS runtime
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="cladapter-mlflow" \
      org.opencontainers.image.description="MLflow tracking server for the CLAdapter platform (PostgreSQL backend store, S3 artifacts)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
COPY --from=build /opt/venv /opt/venv
# A fixed non-root UID/GID (the Deployment's runAsUser), writable HOME for gunicorn.
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/mlflow \
       --shell /usr/sbin/nologin mlflow
# No secrets here: the backend store URI, S3 keys and the auth settings (admin password,
# auth database URI, CSRF key) come from Kubernetes Secrets.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mlflow
WORKDIR /home/mlflow
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]
