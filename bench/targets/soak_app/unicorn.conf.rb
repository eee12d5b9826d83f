# unicorn config for one soak app server; bench/scenarios/soak.py passes everything in the environment.
worker_processes Integer(ENV.fetch("SOAK_WORKERS", "2"))
listen ENV["SOAK_UNIX"], backlog: 5 if ENV["SOAK_UNIX"]
listen ENV.fetch("SOAK_TCP"), backlog: 1024
pid File.join(ENV.fetch("SOAK_DIR"), "unicorn-#{ENV.fetch("SOAK_NAME")}.pid")
timeout 30
preload_app true
