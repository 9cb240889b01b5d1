"""What operators look at: Grafana dashboards and Prometheus rules, generated from code over the one
metrics catalog (`serving.telemetry.metrics.CATALOG`). `python -m serving.observability` (or
`make dashboards`) writes them into `deploy/` and into the Helm chart."""
