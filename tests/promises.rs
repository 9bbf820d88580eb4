//! Promises of DESIGN.md tried against a real archived, without PostgreSQL.
