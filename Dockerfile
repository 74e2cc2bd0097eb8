# paramserver: ps-server, ps-worker and psctl in one image (python:3.11-slim, a venv, a non-root user).
#
#   docker build --network host -t paramserver .      # or: docker compose build
#   docker run --rm -p 127.0.0.1:50051-50052:50051-50052 paramserver        # the server (the default command)
#   docker run --rm -e PS_SERVER=HOST:50051 paramserver ps-worker           # a worker
#
# 50051 is gRPC; 50052 the TCP data plane workers push and pull on (published with the same number:
# a worker dials the server's host at the port the server tells it; without it, workers use gRPC).
#
# Where no image registry is reachable, deploy/build-base-image.sh first provides python:3.11-slim
# (built from Debian packages; its python3 is /usr/bin/python3, the official image's is
# /usr/local/bin/python3: this file only ever says `python3` or the venv's `python`).
#
# Layers of the final image: the base, the user, the dependencies' venv (~440 MB, rebuilt only when
# pyproject.toml changes) and the project itself (< 1 MB, rebuilt on every source change).

# ---- deps: a venv with the dependencies listed in pyproject.toml, and nothing of the source
FROM python:3.11-slim AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# the project's dependencies and its build requirements (setuptools), so the wheel below builds offline
RUN python -c "import tomllib; t = tomllib.load(open('pyproject.toml', 'rb')); \
print(*t['project']['dependencies'], *t['build-system']['requires'], sep='\n')" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# ---- wheel: the project as a wheel (setuptools maps paramserver.v1 = protos/paramserver/v1). The
# slim image has no C compiler: setup.py's optional extension (the worker's C exchange on shared
# memory) is left out, and workers in this image use its Python path.
FROM deps AS wheel
COPY README.md setup.py ./
COPY protos ./protos
COPY paramserver ./paramserver
COPY ps_server ./ps_server
COPY worker ./worker
COPY client ./client
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ---- runtime
FROM python:3.11-slim
LABEL org.opencontainers.image.title="paramserver" \
      org.opencontainers.image.description="Parameter server for distributed training: ps-server, ps-worker, psctl"
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PS_HOST=0.0.0.0 \
    PS_PORT=50051 \
    PS_DATA_PORT=50052
# uid/gid 10001: numeric, so Kubernetes' runAsNonRoot can check it. /data is for checkpoints; a
# named volume mounted there starts out owned by this user.
RUN groupadd --gid 10001 ps \
 && useradd --uid 10001 --gid ps --home-dir /home/ps --create-home --shell /usr/sbin/nologin ps \
 && install -d -o ps -g ps /data
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && pip check \
 && ps-server --help >/dev/null && ps-worker --help >/dev/null && psctl --help >/dev/null
USER 10001:10001
WORKDIR /home/ps
EXPOSE 50051 50052
CMD ["ps-server"]
