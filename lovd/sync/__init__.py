"""PostgreSQL sync: the outbox relay, restore from PostgreSQL, host rows, cross-host reads.

SQLite stays each host's source of truth; PostgreSQL is where operators see every
host's sessions and where a host whose SQLite is lost recovers from. Nothing here is
on a request's path to its answer except the read-only cross-host lookups, which
have short timeouts and fail with a clear problem when PostgreSQL is down.
"""
