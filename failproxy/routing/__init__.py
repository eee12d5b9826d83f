"""Where a request goes: the servers (peer), the failover rules (policy), the
overflow policy (balance) with what it learns (capacity, routes) and reads
(queue_depth, loadshare). Below the proxy; knows nothing of connections."""
