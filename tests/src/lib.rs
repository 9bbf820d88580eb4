//! Test harness: temp dirs, the binaries under test, archived, PostgreSQL clusters.
