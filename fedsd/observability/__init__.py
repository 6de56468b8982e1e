"""Metrics, exporters, Prometheus/Grafana configuration and live progress."""
