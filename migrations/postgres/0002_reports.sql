-- Viewer quality reports (ViewerService.Report) and their per-minute roll-ups.
-- See controlplane/src/reports.rs for how rows are derived and written.
--
-- viewer_reports: one row per accepted report, raw cumulative counters as the SDK sent
-- them plus what the control plane derived at ingest (covered_ms and the deltas since
-- the session's previous report). Pruned after --report-retention; no foreign keys and
-- only one secondary index (for pruning) to keep 2,000+ inserts/s cheap.
CREATE TABLE viewer_reports (
    session_id        TEXT NOT NULL,
    report_seq        BIGINT NOT NULL,
    broadcast_id      TEXT NOT NULL,
    at_ms             BIGINT NOT NULL,
    received_ms       BIGINT NOT NULL,
    bytes_from_server BIGINT NOT NULL,
    bytes_from_peers  BIGINT NOT NULL,
    bytes_uploaded    BIGINT NOT NULL,
    startup_ms        BIGINT NOT NULL,
    stalls            BIGINT NOT NULL,
    stall_ms          BIGINT NOT NULL,
    lag_ms            BIGINT NOT NULL,
    buffer_ms         BIGINT NOT NULL,
    parent_changes    BIGINT NOT NULL,
    peers             BIGINT NOT NULL,
    is_final          BOOLEAN NOT NULL,
    chunks_played     BIGINT NOT NULL,
    chunks_skipped    BIGINT NOT NULL,
    covered_ms        BIGINT NOT NULL,
    d_server_bytes    BIGINT NOT NULL,
    d_peer_bytes      BIGINT NOT NULL,
    d_stall_ms        BIGINT NOT NULL,
    first_in_minute   BOOLEAN NOT NULL,
    first_startup     BOOLEAN NOT NULL,
    PRIMARY KEY (session_id, report_seq)
);

CREATE INDEX viewer_reports_at ON viewer_reports (at_ms);

-- Per broadcast and minute (minute_ms = start of the minute, unix ms), additive so the
-- writer updates it in the same transaction as the raw rows it aggregates. Kept forever.
CREATE TABLE audience_minutes (
    broadcast_id TEXT NOT NULL,
    minute_ms    BIGINT NOT NULL,
    viewers      BIGINT NOT NULL,
    reports      BIGINT NOT NULL,
    watch_ms     BIGINT NOT NULL,
    server_bytes BIGINT NOT NULL,
    peer_bytes   BIGINT NOT NULL,
    stall_ms     BIGINT NOT NULL,
    PRIMARY KEY (broadcast_id, minute_ms)
);

-- The first non-zero start-up time of each session (for exact percentiles over any
-- bucket). Kept forever: one row per session.
CREATE TABLE viewer_startups (
    session_id   TEXT PRIMARY KEY,
    broadcast_id TEXT NOT NULL,
    at_ms        BIGINT NOT NULL,
    startup_ms   BIGINT NOT NULL
);

CREATE INDEX viewer_startups_broadcast ON viewer_startups (broadcast_id, at_ms);
