"""The base package: small helpers every other package may import; it imports nothing of ours
(docs/ARCHITECTURE.md, enforced by tests/unit/test_import_rules.py)."""
