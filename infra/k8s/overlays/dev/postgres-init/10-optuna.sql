-- The tuning workers' Optuna study storage (Secret cladapter-tune, CLADAPTER_TUNE_STORAGE),
-- owned by the superuser of secrets/postgres.env like MLflow's database.
CREATE DATABASE optuna;
