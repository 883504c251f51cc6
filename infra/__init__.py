"""Deployment configuration for the production profile (see infra/README.md); nothing here runs on import."""
