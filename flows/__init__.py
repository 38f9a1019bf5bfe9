"""Prefect flows (simulate -> train -> evaluate), deployments and the `muontrack` CLI."""
