//! End-to-end archive and replay with real PostgreSQL 15.
