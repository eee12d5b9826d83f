# failproxy as a sidecar of an app server container. See README "Running as a sidecar".
#
#   python3 -m pip wheel . -w wheelhouse      # optional: install offline from these wheels
#   docker build -t failproxy .
#
# The app server's container shares the volume /var/run/app and creates its UNIX socket there
# (the default config's upstream is unix:/var/run/app/app.sock); mount your own config at
# /etc/failproxy/config.toml to add the peers' TCP ports.
#
# BASE is any Debian-like image with python3 (>= 3.11) and its venv module at the same path in
# both stages; `make docker-test` passes a local debootstrap image, since Docker Hub may be out
# of reach.
#
# BUILD=compiled (the default): the image runs failproxy's hot modules compiled by mypyc and its
# Cython modules, or the build fails and says why; it never ships the slower pure-Python build
# unannounced. With GCC (the build stage's) the compile is profile-guided: setup.py compiles
# twice around a training load on loopback (failproxy/_pgo.py), which --network=none allows.
# Built from source (no wheelhouse/), the build stage installs gcc for that when the base has no
# compiler (the final stage gets neither). BUILD=pure accepts the pure-Python build on purpose:
# from source it needs no compiler (FAILPROXY_PURE_BUILD=1); from a wheelhouse it is whatever
# wheel is there.
ARG BASE=python:3.11-slim

# -- build: a virtualenv with failproxy and its dependencies --------------------------------------
FROM ${BASE} AS build
LABEL failproxy.stage=build
ARG BUILD=compiled
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# Only what .dockerignore lets through: the package, setup.py, pyproject.toml, README.md,
# LICENSE, wheelhouse/.
COPY . /src
# With a wheelhouse (wheels built on the host: reproducible, and no network needed here, so the
# build runs with --network=none) everything comes from it, failproxy's wheel compiled or not as
# the host built it; without one, pip asks the index and setup.py compiles here.
RUN case "$BUILD" in compiled|pure) ;; \
        *) echo "error: BUILD must be compiled or pure, not '$BUILD'" >&2; exit 1;; esac \
 && python3 -m venv /opt/failproxy \
 && if ls /src/wheelhouse/failproxy-*.whl >/dev/null 2>&1; then \
        /opt/failproxy/bin/pip install --no-index --find-links /src/wheelhouse failproxy; \
    elif [ "$BUILD" = pure ]; then \
        FAILPROXY_PURE_BUILD=1 /opt/failproxy/bin/pip install /src; \
    else \
        headers=$(python3 -c 'import os, sysconfig; print(os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))'); \
        if ! command -v gcc >/dev/null 2>&1 || [ "$headers" != True ]; then \
            packages="gcc libc6-dev"; [ "$headers" = True ] || packages="$packages python3-dev"; \
            echo "installing $packages in the build stage to compile failproxy"; \
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                --no-install-recommends $packages; \
        fi; \
        FAILPROXY_STRICT_BUILD=1 /opt/failproxy/bin/pip install /src; \
    fi \
 && version=$(/opt/failproxy/bin/failproxy --version) \
 && echo "built: $version" \
 && if [ "$BUILD" = compiled ] && [ "${version%(compiled with mypyc and Cython)}" = "$version" ]; then \
        echo "error: this image would run '$version', not the compiled build. A wheelhouse/" \
             "built where no C compiler exists holds the pure-Python wheel: build the wheels" \
             "with gcc installed, remove wheelhouse/ to compile here, or pass" \
             "--build-arg BUILD=pure to ship the pure-Python build on purpose." >&2; \
        exit 1; \
    fi \
 && /opt/failproxy/bin/pip uninstall --yes pip \
 && /opt/failproxy/bin/python -m compileall -q /opt/failproxy

# -- runtime: the virtualenv only (no compiler, no pip, no wheels) -------------------------------
FROM ${BASE}
COPY --from=build /opt/failproxy /opt/failproxy
COPY deploy/docker.toml /etc/failproxy/config.toml
# failproxy runs as an unprivileged user. /var/run/app is the volume shared with the app
# server's container: mode 1777 (as /tmp) lets an app running under any uid create its socket
# there, and failproxy connects to it when the app creates it connectable by others (unicorn
# and gunicorn do by default: umask 0 for the socket).
RUN groupadd --system --gid 10001 failproxy \
 && useradd --system --uid 10001 --gid failproxy --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin failproxy \
 && mkdir -p /var/run/app \
 && chmod 1777 /var/run/app
VOLUME ["/var/run/app"]
ENV PATH=/opt/failproxy/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER failproxy:failproxy
EXPOSE 8000

# GET /healthz on the admin endpoint that the config names (the default config: 127.0.0.1:9180).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "failproxy.process.healthcheck", "/etc/failproxy/config.toml"]

# `docker stop` sends QUIT: a graceful drain of up to server.shutdown_timeout, which must be
# below docker's stop timeout (10 s unless `docker stop -t` / compose's stop_grace_period say
# otherwise). The default config's shutdown_timeout is 8 s for that reason.
STOPSIGNAL SIGQUIT

ENTRYPOINT ["failproxy"]
CMD ["serve", "/etc/failproxy/config.toml"]
