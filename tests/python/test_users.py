"""Users and API keys of an account, through the official `fireworks-ai` client: an admin
creates users and keys for them; a key is shown once and stored hashed; a user uses the
account's resources and manages only their own keys; a deleted or expired key is refused at
the next request; nobody reaches another account's users or keys. Runs on SQLite and on
PostgreSQL with the rest of the suite."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import time

import fireworks
import pytest

from conftest import make_client
from fixtures import RawApi, assert_rpc_error, assert_sdk_error

INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, ALREADY_EXISTS = 3, 9, 5, 6
PERMISSION_DENIED, UNAUTHENTICATED, UNIMPLEMENTED = 7, 16, 12


@pytest.fixture(scope="module")
def alice(client, hearth, uid):
    """A user of the first account with role `user`, and a key of hers."""
    user_id = uid("alice")
    user = client.users.create(user_id=user_id, role="user", display_name="Alice", email=f"{user_id}@example.com")
    key = client.api_keys.create(user_id, api_key={"display_name": "laptop"})
    return user_id, key.key, make_client(hearth, api_key=key.key)


def test_an_admin_creates_a_user_and_a_key_shown_once_and_stored_hashed(client, hearth, alice, uid):
    user_id, key, _ = alice
    raw = RawApi(hearth.base_url, hearth.api_key, hearth.account)
    user = raw.ok_json("GET", f"users/{user_id}")
    assert user["name"] == f"accounts/{hearth.account}/users/{user_id}"
    assert (user["role"], user["displayName"], user["state"]) == ("user", "Alice", "READY"), user
    names = {u.name for u in client.users.list()}
    assert {f"accounts/{hearth.account}/users/admin", user["name"]} <= names, names

    assert key.startswith("hth_") and len(key) > 40, key
    listed = raw.ok_json("GET", f"users/{user_id}/apiKeys")
    text = json.dumps(listed)
    assert key not in text and key[8:] not in text, "a listed key must not show its text"
    assert hashlib.sha256(key.encode()).hexdigest() not in text, "a listed key must not show its hash"
    [only] = listed["apiKeys"]
    assert only["displayName"] == "laptop" and only["prefix"] == key[:8] and only["secure"] is True, only
    assert only["email"] == f"{user_id}@example.com" and "key" not in only, only
    sdk_listed = list(client.api_keys.list(user_id))
    assert [k.key_id for k in sdk_listed] == [only["keyId"]] and sdk_listed[0].key is None


def test_a_user_uses_the_account_but_manages_only_their_own_keys(client, hearth, alice, uid):
    user_id, _, as_alice = alice
    # The account's resources: listing models is fine.
    list(as_alice.models.list())
    # Her own keys: create, list and delete.
    extra = as_alice.api_keys.create(user_id, api_key={"display_name": "ci"})
    assert extra.key_id in {k.key_id for k in as_alice.api_keys.list(user_id)}
    as_alice.api_keys.delete(user_id, key_id=extra.key_id)
    # Nobody else's keys, no users, no roles.
    for call in (
        lambda: as_alice.users.list(),
        lambda: as_alice.users.create(user_id=uid("mallory"), role="admin"),
        lambda: as_alice.users.update(user_id, role="admin"),
        lambda: as_alice.api_keys.create("admin", api_key={}),
        lambda: as_alice.api_keys.list("admin"),
        lambda: as_alice.users.get("admin"),
    ):
        with pytest.raises(fireworks.PermissionDeniedError) as e:
            call()
        assert_sdk_error(e.value, 403, PERMISSION_DENIED)
    assert as_alice.users.get(user_id).role == "user"


def test_no_one_reaches_another_accounts_users_or_keys(client, client2, hearth, alice):
    user_id, _, as_alice = alice
    for call in (
        lambda: client2.users.list(account_id=hearth.account),
        lambda: client2.users.get(user_id, account_id=hearth.account),
        lambda: client2.api_keys.list(user_id, account_id=hearth.account),
        lambda: client2.api_keys.create(user_id, account_id=hearth.account, api_key={}),
        lambda: as_alice.users.list(account_id=hearth.account2),
        lambda: as_alice.models.list(account_id=hearth.account2),
    ):
        with pytest.raises(fireworks.PermissionDeniedError) as e:
            call()
        assert_sdk_error(e.value, 403, PERMISSION_DENIED)


def test_a_deleted_key_is_refused_at_the_next_request(client, hearth, uid):
    user_id = uid("bob")
    client.users.create(user_id=user_id, role="user")
    created = client.api_keys.create(user_id, api_key={})
    as_bob = make_client(hearth, api_key=created.key, max_retries=0)
    list(as_bob.models.list())
    client.api_keys.delete(user_id, key_id=created.key_id)
    with pytest.raises(fireworks.AuthenticationError) as e:
        list(as_bob.models.list())
    assert_sdk_error(e.value, 401, UNAUTHENTICATED)
    with pytest.raises(fireworks.NotFoundError):
        client.api_keys.delete(user_id, key_id=created.key_id)


def test_an_expired_key_is_refused(client, hearth, uid):
    user_id = uid("carol")
    client.users.create(user_id=user_id, role="user")
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3)
    created = client.api_keys.create(user_id, api_key={"expire_time": expires})
    raw = RawApi(hearth.base_url, created.key, hearth.account)
    assert raw.get("models").status_code == 200
    time.sleep(max(0.0, (expires - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 0.5)
    body = assert_rpc_error(raw.get("models"), 401, UNAUTHENTICATED)
    assert "expired" in body["message"], body


def test_roles_change_at_once_and_the_last_admin_stays_one(client, hearth, uid):
    user_id = uid("dave")
    client.users.create(user_id=user_id, role="user")
    key = client.api_keys.create(user_id, api_key={}).key
    as_dave = make_client(hearth, api_key=key)
    with pytest.raises(fireworks.PermissionDeniedError):
        as_dave.users.list()
    client.users.update(user_id, role="admin")
    assert f"accounts/{hearth.account}/users/{user_id}" in {u.name for u in as_dave.users.list()}
    # Two admins: one may step down; then the other may not.
    as_dave.users.update(user_id, role="user")
    with pytest.raises(fireworks.BadRequestError) as e:
        client.users.update("admin", role="user")
    assert_sdk_error(e.value, 400, FAILED_PRECONDITION)


def test_bad_users_and_keys_are_refused_with_a_message_and_change_nothing(client, hearth, uid, alice):
    raw = RawApi(hearth.base_url, hearth.api_key, hearth.account)
    before = raw.ok_json("GET", "users", params={"pageSize": 200})
    cases = [
        ("POST", "users?userId=" + uid("x"), {"role": "root"}, 400, INVALID_ARGUMENT),
        ("POST", "users?userId=" + uid("x"), {"role": "inference-user"}, 501, UNIMPLEMENTED),
        ("POST", "users?userId=" + uid("x"), {"role": "user", "permissionPreset": "p"}, 501, UNIMPLEMENTED),
        ("POST", "users?userId=" + uid("x"), {}, 400, INVALID_ARGUMENT),
        ("POST", "users?userId=" + uid("x"), {"role": "user", "email": "not-an-email"}, 400, INVALID_ARGUMENT),
        ("POST", "users?userId=Bad_Id", {"role": "user"}, 400, INVALID_ARGUMENT),
        ("POST", "users", {"role": "user"}, 400, INVALID_ARGUMENT),
        ("POST", f"users?userId={alice[0]}", {"role": "user"}, 409, ALREADY_EXISTS),
        ("POST", "users?userId=" + uid("x"), {"role": "user", "favouriteColour": "red"}, 400, INVALID_ARGUMENT),
        ("PATCH", "users/nobody", {"role": "user"}, 404, NOT_FOUND),
        ("POST", "users/nobody/apiKeys", {"apiKey": {}}, 404, NOT_FOUND),
        ("POST", f"users/{alice[0]}/apiKeys", {"apiKey": {"expireTime": "2001-01-01T00:00:00Z"}}, 400, INVALID_ARGUMENT),
        ("POST", f"users/{alice[0]}/apiKeys", {}, 400, INVALID_ARGUMENT),
        ("POST", f"users/{alice[0]}/apiKeys:delete", {"keyId": "nope"}, 404, NOT_FOUND),
    ]
    for method, path, body, status, code in cases:
        body_out = assert_rpc_error(raw.request(method, path, json=body), status, code)
        assert "internal" not in body_out["message"].lower(), body_out
    assert raw.ok_json("GET", "users", params={"pageSize": 200}) == before
    assert len(raw.ok_json("GET", f"users/{alice[0]}/apiKeys")["apiKeys"]) == 1
