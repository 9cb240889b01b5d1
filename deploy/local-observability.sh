#!/usr/bin/env bash
# A real Prometheus on loopback scraping a local `epd serve`, with the EPD recording rules and alerts.
#   epd serve --port 8000 &            # in another terminal
#   deploy/local-observability.sh      # PORT=8000 PROM_PORT=9091 SCRAPE=5s to change
# Prometheus comes from Debian (`apt-get install prometheus`, or `make tools`). Its data lives in a
# temporary directory removed on exit. Open http://127.0.0.1:$PROM_PORT/alerts and /graph; point Grafana
# at it with deploy/grafana/provisioning/ to see the dashboards.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PORT="${PORT:-8000}"
PROM_PORT="${PROM_PORT:-9091}"
SCRAPE="${SCRAPE:-5s}"
command -v prometheus >/dev/null || { echo "prometheus not found: apt-get install prometheus" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/prometheus/epd-rules.yml" "$work/epd-rules.yml"
sed -e "s/127.0.0.1:8000/127.0.0.1:${PORT}/" \
    -e "s/scrape_interval: 15s/scrape_interval: ${SCRAPE}/" \
    -e "s/evaluation_interval: 15s/evaluation_interval: ${SCRAPE}/" \
    "$here/prometheus/prometheus.yml" > "$work/prometheus.yml"
promtool check config "$work/prometheus.yml"
echo "Prometheus on http://127.0.0.1:${PROM_PORT} scraping http://127.0.0.1:${PORT}/metrics every ${SCRAPE}"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="127.0.0.1:${PROM_PORT}" --log.level=warn
