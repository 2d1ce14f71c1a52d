"""The auth callout's decision and JWTs (llooma.callout), with keys made here: a host is
admitted only with a registered key whose signature over the server's nonce checks out, and
then only into the hosts account with its own subjects."""

from __future__ import annotations

import base64
import json

import nkeys
import pytest

from llooma import callout, subjects
from llooma.credentials import HOSTS_ACCOUNT, new_seed, public_key

NONCE = "q2Jd0aNfUQk9zA"


def keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(new_seed(prefix))


SERVER = keypair(nkeys.PREFIX_BYTE_SERVER)
ISSUER = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
USER_NKEY = keypair(nkeys.PREFIX_BYTE_USER).public_key.decode()


def request(client_seed: bytes, *, signer: bytes | None = None, nonce: str = NONCE) -> str:
    """An authorization request as nats-server writes one for a client that signed `nonce`
    with `signer` (default: its own seed) and presented `client_seed`'s public key."""
    signature = nkeys.from_seed(signer or client_seed).sign(NONCE.encode())
    claims = {
        "sub": USER_NKEY,
        "aud": "nats-authorization-request",
        "nats": {
            "type": "authorization_request",
            "version": 2,
            "user_nkey": USER_NKEY,
            "server_id": {"name": "nats-1", "id": SERVER.public_key.decode()},
            "client_info": {"host": "127.0.0.1", "id": 7, "nonce": nonce},
            "connect_opts": {
                "nkey": public_key(client_seed),
                "sig": base64.b64encode(signature).decode(),
            },
        },
    }
    return callout.encode(claims, SERVER)


def test_a_registered_host_is_placed_in_the_hosts_account_with_its_own_subjects() -> None:
    seed = new_seed()
    answer, host = callout.answer(request(seed), ISSUER, {public_key(seed): "host-a"})
    assert host == "host-a"
    response = callout.decode(answer, nkeys.PREFIX_BYTE_ACCOUNT)
    assert response["iss"] == ISSUER.public_key.decode()
    assert response["sub"] == USER_NKEY
    assert response["aud"] == SERVER.public_key.decode()
    assert "error" not in response["nats"]
    user = callout.decode(response["nats"]["jwt"], nkeys.PREFIX_BYTE_ACCOUNT)
    assert user["iss"] == ISSUER.public_key.decode()
    assert user["sub"] == USER_NKEY
    assert user["aud"] == HOSTS_ACCOUNT
    assert "name" not in user, "a name would hide the host's key from CONNZ (revocation)"
    rights = user["nats"]
    assert rights["pub"] == {"allow": [subjects.host_heartbeat("host-a")]}
    assert rights["sub"] == {
        "allow": [subjects.host_tasks_any_model("host-a"), subjects.host_cancel("host-a")]
    }
    assert rights["resp"]["max"] > 0
    assert rights["resp"]["ttl"] > 0


@pytest.mark.parametrize(
    "case", ["unregistered", "signed by another key", "another nonce", "no signature"]
)
def test_anything_but_a_registered_key_proving_itself_is_refused(case: str) -> None:
    seed = new_seed()
    registry = {} if case == "unregistered" else {public_key(seed): "host-a"}
    if case == "signed by another key":
        token = request(seed, signer=new_seed())
    elif case == "another nonce":
        token = request(seed, nonce="another-nonce")
    else:
        token = request(seed)
    if case == "no signature":
        claims = callout.decode(token, nkeys.PREFIX_BYTE_SERVER)
        claims["nats"]["connect_opts"]["sig"] = ""
        token = callout.encode(claims, SERVER)
    answer, host = callout.answer(token, ISSUER, registry)
    assert host == ""
    response = callout.decode(answer, nkeys.PREFIX_BYTE_ACCOUNT)
    assert response["nats"]["error"]
    assert "jwt" not in response["nats"]


def test_a_request_not_signed_by_a_server_key_is_rejected() -> None:
    seed = new_seed()
    token = request(seed)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["nats"]["connect_opts"]["nkey"] = public_key(new_seed())
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(callout.InvalidJwt):
        callout.answer(f"{header}.{forged}.{signature}", ISSUER, {public_key(seed): "a"})
    signed_by_a_user = callout.encode(claims, keypair(nkeys.PREFIX_BYTE_USER))
    with pytest.raises(callout.InvalidJwt):
        callout.answer(signed_by_a_user, ISSUER, {public_key(seed): "a"})
