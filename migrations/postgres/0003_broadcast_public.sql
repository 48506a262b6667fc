-- Rights management (issue 4). Named after its first change; it also holds the other
-- schema of the rights work so that it stays one migration:
--  * broadcasts.public: viewers may join without a credential.
--  * nodes.chunk_key_id / chunk_key: the Ed25519 public key a data-plane node signs
--    chunks with (raw 32 bytes), handed to viewers at join.
--  * token_keys: the control plane's chunk-token signing keys (PKCS#8 private keys),
--    shared by every replica on the same database. The highest key_id signs; a key
--    with retire_at_ms set is still published (accepted) until then.
ALTER TABLE broadcasts ADD COLUMN public BOOLEAN NOT NULL DEFAULT FALSE;

ALTER TABLE nodes ADD COLUMN chunk_key_id BIGINT;
ALTER TABLE nodes ADD COLUMN chunk_key BYTEA;

CREATE TABLE token_keys (
    key_id        BIGINT PRIMARY KEY,
    pkcs8         BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    retire_at_ms  BIGINT
);
