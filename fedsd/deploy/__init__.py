"""Running a federation: local TLS deployments, certificates, warm app starts, and the
command-line arguments of ``fedsd up``."""
