# unicorn for the "slowclients" scenario; bench/scenarios/slowclients.py passes everything in the
# environment. As in the seed: a UNIX socket with a tiny backlog (5), 2 workers. The timeout
# leaves room for a 1 GiB upload (read, hashed and spooled by unicorn's TeeInput).
worker_processes Integer(ENV.fetch("BENCH_WORKERS", "2"))
listen ENV.fetch("BENCH_UNIX"), backlog: Integer(ENV.fetch("BENCH_UNIX_BACKLOG", "5"))
pid File.join(ENV.fetch("BENCH_DIR"), "unicorn-slowclients.pid")
timeout 300
preload_app true
