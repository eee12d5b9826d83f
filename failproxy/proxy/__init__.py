"""One request's walk: the client connection (downstream) parses it, the
exchange takes it from server to server, the upstream connection relays the
answer; with the bytes (headers, request, spool, compress, static), the timers
and transports they run on, and the events they log."""
