"""Tests of the deployment and infrastructure files (deployments/, infra/, the Dockerfile)."""
