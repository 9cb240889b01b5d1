"""Load generation against any OpenAI-compatible server: workloads, open- and closed-loop arrivals,
a streaming client that times every token, reports with SLO attainment and goodput, plots."""
