"""Who the peers are: DNS lookups (resolver) watched over time (watch), this
box's own addresses (netaddrs), and the peer table the master shares with
the workers (peertable)."""
