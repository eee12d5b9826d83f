# failproxy as a sidecar: it shares a volume with the app server's container, in which the app
# server creates its UNIX socket (backlog 5); failproxy tries that socket first on every request
# and fails over to the peers' TCP ports listed in the config.
#
#   docker build -t failproxy .
#   docker run -v app-sock:/var/run/app -v ./config.toml:/etc/failproxy/config.toml:ro \
#              -p 80:8000 failproxy
#
# The config's UNIX server address must be inside the shared volume, e.g.
# address = "unix:/var/run/app/app.sock", and its listen address must not be loopback-only
# (e.g. listen = ["0.0.0.0:8000"]).

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY failproxy ./failproxy
RUN pip install . && rm -rf /src

# The UNIX socket directory shared with the app server's container.
VOLUME ["/var/run/app"]
WORKDIR /

# `docker stop` then sends QUIT: a graceful drain (unicorn's meaning), as the nginx image does.
# Give it `docker stop -t` at least server.shutdown_timeout (30 s by default).
STOPSIGNAL SIGQUIT
EXPOSE 8000

ENTRYPOINT ["failproxy"]
CMD ["serve", "/etc/failproxy/config.toml"]
