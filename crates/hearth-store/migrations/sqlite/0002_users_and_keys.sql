-- Keys belong to a user of their account. Keys bound before users existed have no user: the
-- control plane reads them as its bootstrap admin's. key_id names a key in the API; body is
-- the key's metadata as the control plane shapes it (the store does not read it).
ALTER TABLE api_keys ADD COLUMN user_id TEXT;
ALTER TABLE api_keys ADD COLUMN key_id TEXT;
ALTER TABLE api_keys ADD COLUMN expire_us INTEGER;
ALTER TABLE api_keys ADD COLUMN body TEXT;
CREATE UNIQUE INDEX api_keys_by_user ON api_keys (account, user_id, key_id);
