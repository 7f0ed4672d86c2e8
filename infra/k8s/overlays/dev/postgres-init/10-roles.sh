#!/bin/sh
# Sourced by the postgres image's entrypoint on the first start (empty volume), as the
# admin of secrets/postgres.env (POSTGRES_USER, a superuser the services never use):
# the roles and databases of roles.psql. The passwords reach psql through the
# environment (Secret cladapter-postgres, envFrom), never through its command line.
# Sourced, not run: no `set` here, the entrypoint's own options (-e) apply.
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in secrets/postgres.env}"
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD in secrets/postgres.env}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -f /docker-entrypoint-initdb.d/roles.psql
