"""Metrics: one catalog, per-stage timings, SLO attainment counters."""
