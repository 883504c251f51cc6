"""Artifacts and versions of adapters: content hashes, a verified artifact store, the MLflow-backed adapter registry.

Modules: `hashing` (sha256 of files, trees, base weights), `names` (name/key rules, `family@selector` refs), `store`
(local or S3 content-addressed store), `binding` (the base binding inside an adapter directory), `versions` (MLflow
versions, aliases, promote/rollback, resolve, verify). Import them
directly; this package file stays empty so that `registry.store` loads without MLflow.
"""
