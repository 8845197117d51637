-- One database per server (the user and its password come from POSTGRES_USER/POSTGRES_PASSWORD).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
