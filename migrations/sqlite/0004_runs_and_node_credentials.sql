-- Trust you can deploy (issue 18, parts 3 and 4):
--  * broadcasts.run_epoch: counts the StartBroadcast calls; the ingesting node signs
--    every chunk with the current run, so a restarted broadcast's chunks are told
--    from the previous run's (docs/PROTOCOL.md, "Chunk signature block").
--  * node_credentials: one credential per data-plane node (`starling-admin node add`).
--    Only the SHA-256 of the secret is stored; a revoked credential keeps its row
--    (revoked_at_ms set) so that its name is not reused by mistake.
ALTER TABLE broadcasts ADD COLUMN run_epoch BIGINT NOT NULL DEFAULT 0;

CREATE TABLE node_credentials (
    name           TEXT PRIMARY KEY,
    secret_sha256  BLOB NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    revoked_at_ms  BIGINT
);
