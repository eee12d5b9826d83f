"""What failproxy tells: the log (structlog, and the access log's own fast writer),
the metrics shared by the workers, and the loop turn's end where both are
flushed. Imports nothing of the layers above it."""
