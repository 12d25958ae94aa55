-- Runs once, when the PostgreSQL volume is created: the staging database beside Airflow's
-- metadata database (both owned by the compose file's POSTGRES_USER).
CREATE DATABASE medspa;
