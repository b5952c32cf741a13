"""Prometheus observability for the chat relay (a2/mychatserver.py).

Why a separate package: a2/ must stay the assignment's stdlib-only files, so
everything that needs prometheus-client lives here and is imported only when
the server is started with --metrics-port. This __init__ deliberately imports
nothing, so `import metrics` alone never pulls in prometheus-client.

    metrics/exporter.py     the /metrics endpoint: a custom Collector that
                            translates ChatServer.stats() at scrape time, and
                            the bounded one-thread HTTP server that serves it
    metrics/prometheus.yml  scrape config for a real Prometheus
    metrics/rules.yml       recording and alerting rules
    metrics/rules_test.yml  their unit tests (promtool test rules metrics/rules_test.yml)
    metrics/dashboard.json  Grafana dashboard (import it, pick a Prometheus)
    metrics/README.md       how to run it and what every metric/alert means
"""
