-- Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d). The `mlflow` database is
-- POSTGRES_DB; Prefect's server gets its own, and `adapterops` holds the shared state every serving replica and
-- worker uses (ADAPTEROPS_STATE_DB_URL: rollout state, prediction log; their tables are created on first use).
CREATE DATABASE prefect;
CREATE DATABASE adapterops;
