# One image for the coordinator and the clients; docker-compose.yml picks the command.
#   docker build -t fedgrpc:latest .
#   docker run --rm fedgrpc:latest fedserver run --help
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Non-root user that owns the state dir; a fixed uid keeps volume ownership stable across builds.
RUN groupadd --system --gid 10001 fed \
 && useradd --system --uid 10001 --gid fed --create-home --home-dir /home/fed fed

WORKDIR /app

# torch first, in its own layer keyed on constraints.txt only, so editing the code or
# pyproject.toml does not re-download it.
# The CPU wheel comes from PyTorch's own index: the default index (PyPI) resolves torch on Linux
# to the CUDA build, which pulls multi-GB nvidia-* wheels that a CPU-only container never uses.
COPY constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cpu

# The rest of the dependencies come from PyPI at the versions pinned in constraints.txt;
# torch==2.13.0+cpu already satisfies the torch==2.13.0 pin, so it is not replaced.
COPY pyproject.toml README.md ./
COPY fedcore ./fedcore
COPY fedserver ./fedserver
COPY fedclient ./fedclient
COPY examples ./examples
COPY protos ./protos
RUN pip install --no-cache-dir -c constraints.txt . \
 && rm -rf build ./*.egg-info

# The coordinator's state dir and the certificates folder (`fedserver certs --out /certs`).
# Declared after the chown so fresh named volumes start out owned by fed (Docker copies the
# image's ownership into an empty volume); /certs holds private keys, so only fed may enter.
RUN mkdir -p /state /certs && chown fed:fed /state /certs && chmod 700 /certs
VOLUME /state /certs

USER fed
# gRPC (mTLS in docker-compose.yml) and Prometheus metrics (--metrics-port 9100).
EXPOSE 50051 9100

# No ENTRYPOINT: `docker run fedgrpc fedclient run ...` and `... fedserver run ...` both work.
CMD ["fedserver", "--help"]
