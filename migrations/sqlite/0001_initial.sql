-- Starling initial schema. Times are unix milliseconds (BIGINT) for portability
-- between Postgres and SQLite; enums are stored as their proto integer values.
CREATE TABLE nodes (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    wire_addr        TEXT NOT NULL,
    http_addr        TEXT NOT NULL,
    cores            INTEGER NOT NULL,
    capacity_viewers INTEGER NOT NULL,
    alive            BOOLEAN NOT NULL,
    viewers          INTEGER NOT NULL DEFAULT 0,
    registered_at_ms BIGINT NOT NULL,
    last_seen_ms     BIGINT NOT NULL
);

CREATE TABLE broadcasts (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    source_url        TEXT NOT NULL,
    chunk_duration_ms INTEGER NOT NULL,
    substreams        INTEGER NOT NULL,
    state             INTEGER NOT NULL,
    source_health     INTEGER NOT NULL,
    source_error      TEXT NOT NULL DEFAULT '',
    node_id           TEXT REFERENCES nodes(id),
    last_seq          BIGINT NOT NULL DEFAULT 0,
    content_type      TEXT NOT NULL DEFAULT '',
    viewers_now       INTEGER NOT NULL DEFAULT 0,
    created_at_ms     BIGINT NOT NULL,
    updated_at_ms     BIGINT NOT NULL
);

CREATE INDEX broadcasts_state ON broadcasts (state);
CREATE INDEX broadcasts_node ON broadcasts (node_id);

CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    broadcast_id   TEXT NOT NULL REFERENCES broadcasts(id),
    client_version TEXT NOT NULL DEFAULT '',
    node_id        TEXT,
    joined_at_ms   BIGINT NOT NULL,
    last_seen_ms   BIGINT NOT NULL,
    left_at_ms     BIGINT
);

CREATE INDEX sessions_broadcast ON sessions (broadcast_id);
