# The C entry of _accessline.pyx: the access line from C values, for the C core (_core.pyx),
# which then boxes none of the request's numbers for it.

cdef bytes line(object timestamp, long long pid, object request_id, bytes method, bytes path,
                long long status, long long bytes_sent, double duration_ms, str client,
                object upstream, tuple upstreams, long long tries, bint overflowed,
                double connect_ms, double held_ms, double upstream_ms, str route,
                long long spilled_bytes, bint static)
