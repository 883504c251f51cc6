-- The postgres service creates the `mlflow` database (POSTGRES_DB); Prefect's server gets its own database.
CREATE DATABASE prefect;
