# unicorn config for one bench host; bench/scenarios/seed.py passes everything in the environment.
# The seed's layout: a UNIX socket with a tiny backlog (fails fast when the box is busy)
# and a TCP port with a large one (fails slowly), both served by the same workers.
worker_processes Integer(ENV.fetch("BENCH_WORKERS", "2"))
listen ENV.fetch("BENCH_UNIX"), backlog: Integer(ENV.fetch("BENCH_UNIX_BACKLOG", "5"))
listen ENV.fetch("BENCH_TCP"), backlog: Integer(ENV.fetch("BENCH_TCP_BACKLOG", "1024"))
pid File.join(ENV.fetch("BENCH_DIR"), "unicorn-#{ENV.fetch("BENCH_HOST")}.pid")
timeout 60
preload_app true
