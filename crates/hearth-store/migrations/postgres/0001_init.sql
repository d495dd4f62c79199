-- Resources are stored as JSON documents keyed by (kind, account, id), with a version for
-- optimistic concurrency. The control plane owns their shape; the store only keeps them.
CREATE TABLE objects (
    kind        TEXT    NOT NULL,
    account     TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    version     BIGINT NOT NULL,
    create_us   BIGINT NOT NULL,
    update_us   BIGINT NOT NULL,
    PRIMARY KEY (kind, account, id)
);

CREATE TABLE accounts (
    id          TEXT    NOT NULL PRIMARY KEY,
    create_us   BIGINT NOT NULL
);

-- Only the SHA-256 of a key is kept: a leaked database does not leak usable keys.
CREATE TABLE api_keys (
    key_hash    TEXT    NOT NULL PRIMARY KEY,
    account     TEXT    NOT NULL REFERENCES accounts(id),
    create_us   BIGINT NOT NULL
);

-- Server-wide secrets (the upload-signing key), created once and shared by every gateway
-- that uses this store.
CREATE TABLE secrets (
    name        TEXT    NOT NULL PRIMARY KEY,
    value       BYTEA    NOT NULL
);
