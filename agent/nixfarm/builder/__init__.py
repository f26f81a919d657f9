"""What runs on a builder: the agent service, the gateway behind each client key,
the metrics snapshot, the store GC, per-client accounts, the Prometheus endpoint."""
