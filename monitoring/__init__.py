"""Monitoring: prediction log, drift tests (KS on logit statistics, embedding similarity), reports and alerts.

Imports nothing from the other adapterops packages. Submodules are imported explicitly (`monitoring.drift`,
`monitoring.store`, ...) so that light users do not pay for sentence-transformers or Evidently.
"""
