"""The processes: the master (signals, reloads, the admin endpoint, the
listeners it opens) and its workers, which serve the proxy; plus what the
master reads at scrape time and the container health check."""
