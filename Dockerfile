# One image for the coordinator and the clients; docker-compose.yml picks the command.
#   docker build -t fedgrpc:latest .
#   docker run --rm fedgrpc:latest fedserver run --help
# BASE_IMAGE: any Debian-like image with Python 3.11 and its venv module. python:3.11-slim on a
# machine that reaches Docker Hub; `make docker-e2e` passes a local stand-in where none is
# reachable (docker/host-setup.sh, docs/deploy.md).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# A venv, not the system site-packages: Debian's own python3 refuses `pip install` there
# (externally managed), python:3.11-slim does not care either way. PATH is spelled out: an
# imported stand-in has none for $PATH to extend.
RUN python3 -m venv /opt/venv

# Dependencies are installed in a throwaway stage, so the torch wheel copied from the build
# context (docker/wheels/) never becomes a layer of the final image.
FROM base AS deps
WORKDIR /src
# torch first, in its own layer keyed on constraints.txt and docker/wheels/ only, so editing the
# code or pyproject.toml does not reinstall it. The CPU wheel: from docker/wheels/ when
# host-setup.sh put one there, else from PyTorch's CPU index (PyPI resolves torch on Linux to
# the CUDA build, which pulls multi-GB nvidia-* wheels a CPU-only container never uses).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY constraints.txt ./
COPY docker/wheels/ /tmp/wheels/
RUN if ls /tmp/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir -c constraints.txt --find-links /tmp/wheels "torch==2.13.0+cpu"; \
    else \
        pip install --no-cache-dir -c constraints.txt torch==2.13.0 --index-url "$TORCH_INDEX_URL"; \
    fi

# The rest of the dependencies, from PyPI at the versions pinned in constraints.txt, keyed on
# pyproject.toml: editing the code reuses this layer. torch==2.13.0+cpu already satisfies the
# torch==2.13.0 pin, so it is not replaced.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r requirements.txt

FROM base
# Non-root user that owns the state dir; a fixed uid keeps volume ownership stable across builds
# (docker-compose.yml's certs service hands each identity's folder to this uid: --owner).
RUN groupadd --system --gid 10001 fed \
 && useradd --system --uid 10001 --gid fed --create-home --home-dir /home/fed fed

# Mount points for the coordinator's state dir and the certificates folder. A fresh named volume
# mounted on a path the image has starts out with that path's owner and mode (Docker copies
# them), so these volumes belong to fed; /certs holds private keys, so only fed may enter.
# No VOLUME instruction: it would give every container (clients included) anonymous volumes
# that outlive it; docker-compose.yml names the volumes each service mounts.
RUN mkdir -p /state /certs && chown fed:fed /state /certs && chmod 700 /state /certs

COPY --from=deps /opt/venv /opt/venv

# The project itself: only its own files change from one build to the next.
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY fedcore ./fedcore
COPY fedserver ./fedserver
COPY fedclient ./fedclient
COPY examples ./examples
COPY protos ./protos
RUN pip install --no-cache-dir --no-deps -c constraints.txt . \
 && cd / && rm -rf /src

WORKDIR /home/fed
USER fed
# gRPC (mTLS in docker-compose.yml) and Prometheus metrics (--metrics-port 9100).
EXPOSE 50051 9100

# No ENTRYPOINT: `docker run fedgrpc fedclient run ...` and `... fedserver run ...` both work.
CMD ["fedserver", "--help"]
