-- Least-privilege roles for etrm-sync (run once per cluster as a superuser or a CREATEROLE admin,
-- e.g. psql -v app_password="'…'" -v owner_password="'…'" -f deploy/postgres/roles.sql):
--   etrm_owner   owns the schema; only `etrm-sync migrate` logs in as it (the migration Job);
--   etrm_writer  group role the migrations grant to (migration 0006): working tables, and on the
--                audit trail only SELECT, INSERT and the sequencer's one-time UPDATE;
--   etrm_app     what the intake, the workers and the operators' commands log in as.
-- Neither etrm_writer nor etrm_app owns a table: they cannot ALTER one (so cannot disable the
-- audit triggers), and they have no DELETE or TRUNCATE on the audit tables. A superuser can still
-- rewrite anything; the signed checkpoints kept outside the database (ETRM_AUDIT_CHECKPOINT_DIR)
-- are what `etrm-sync audit verify` catches that with.
CREATE ROLE etrm_owner LOGIN PASSWORD :owner_password;
CREATE ROLE etrm_writer NOLOGIN;
CREATE ROLE etrm_app LOGIN PASSWORD :app_password IN ROLE etrm_writer;
CREATE DATABASE etrm OWNER etrm_owner;
\connect etrm
ALTER SCHEMA public OWNER TO etrm_owner;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
