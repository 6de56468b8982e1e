"""Entry points of the images, run by ``services/*/entrypoint.sh`` as ``python -m``:

    fedsd.deploy.containers.launch       the launcher (register node keys, submit the run)
    fedsd.deploy.containers.k8s_certs    the Kubernetes certs Job (Secrets)
    fedsd.deploy.containers.healthcheck  every container's health check

Kept empty: the SuperLink image runs the health check from a copy of the package's
sources without fedsd's dependencies (only Flower's), so nothing here may import more
than the module asked for.
"""
