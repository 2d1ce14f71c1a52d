"""Admission by NATS auth callout: who may connect as a host, decided per connection.

nats-server sends every connection that is not one of the control plane's own keys to
`$SYS.REQ.USER.AUTH` as an authorization request (a JWT it signs with its server key). The
answer (a JWT signed with the callout issuer's account key) either refuses the connection or
carries a user JWT that places it in the `HOSTS` account with that host's permissions. This
module is the decision and the JWT encoding, with no transport; `llooma.callout_responder`
subscribes it to the server.

A host proves who it is as with a plain nkey user: it signs the server's nonce with its seed.
The server does not check that signature for a key it does not know, so it is checked here,
against the public key the registry holds for that host.

JWTs here are what github.com/nats-io/jwt v2 writes: a header {"typ":"JWT","alg":"ed25519-nkey"},
the claims, and an Ed25519 signature by the issuer's nkey, each base64url without padding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from llooma import subjects
from llooma.credentials import HOSTS_ACCOUNT

# A reply subject stays open for a host as long as a long generation may take.
REPLY_WINDOW_S = 30 * 60
MAX_REPLIES_PER_TASK = 1_000_000
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_NO_LIMIT = -1


class InvalidJwt(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_bytes(public_key: str, prefix: int) -> bytes:
    """The 32-byte Ed25519 key inside an nkey public key (`U...`, `N...`), checksum checked."""
    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (binascii.Error, ValueError) as error:
        raise InvalidJwt(f"not an nkey: {public_key!r}") from error
    if len(raw) != 35 or raw[0] != prefix:
        raise InvalidJwt(f"not an nkey of the expected kind: {public_key!r}")
    body, checksum = raw[:-2], raw[-2:]
    if nkeys.crc16(body).to_bytes(2, "little") != checksum:
        raise InvalidJwt(f"bad nkey checksum: {public_key!r}")
    return body[1:]


def signed_by(public_key: str, prefix: int, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key_bytes(public_key, prefix)).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def encode(claims: dict[str, Any], issuer: nkeys.KeyPair) -> str:
    claims = {**claims, "iss": issuer.public_key.decode(), "iat": int(time.time())}
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest())
        .decode()
        .rstrip("=")
    )
    signing_input = f"{_b64(json.dumps(_HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
    signature: bytes = issuer.sign(signing_input.encode())
    return f"{signing_input}.{_b64(signature)}"


def decode(token: str, issuer_prefix: int) -> dict[str, Any]:
    """The claims of a JWT whose signature is its issuer's (`iss`, of the given nkey kind)."""
    try:
        header, payload, signature = token.split(".")
        claims: dict[str, Any] = json.loads(_unb64(payload))
        issuer = str(claims["iss"])
        valid = signed_by(issuer, issuer_prefix, f"{header}.{payload}".encode(), _unb64(signature))
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidJwt(f"undecodable JWT: {error}") from error
    if not valid:
        raise InvalidJwt("JWT signature does not match its issuer")
    return claims


def host_permissions(host_id: str) -> dict[str, Any]:
    """A host's rights, in the user JWT's terms: its own heartbeat, task and cancel subjects,
    and replies to tasks it was sent."""
    return {
        "pub": {"allow": [subjects.host_heartbeat(host_id)]},
        "sub": {"allow": [subjects.host_tasks_any_model(host_id), subjects.host_cancel(host_id)]},
        "resp": {"max": MAX_REPLIES_PER_TASK, "ttl": REPLY_WINDOW_S * 1_000_000_000},
    }


@dataclass(frozen=True)
class Request:
    """What the server asks: who connects (the key it claims, its signature over the
    server's nonce) and the keys the answer must name."""

    user_nkey: str
    server_id: str
    client_key: str
    nonce: str
    signature: str


def parse_request(token: str) -> Request:
    claims = decode(token, nkeys.PREFIX_BYTE_SERVER)
    nats = claims.get("nats", {})
    if nats.get("type") != "authorization_request":
        raise InvalidJwt("not an authorization request")
    options = nats.get("connect_opts", {})
    return Request(
        user_nkey=str(nats.get("user_nkey", "")),
        server_id=str(nats.get("server_id", {}).get("id", "")),
        client_key=str(options.get("nkey", "")),
        nonce=str(nats.get("client_info", {}).get("nonce", "")),
        signature=str(options.get("sig", "")),
    )


def _signature_bytes(text: str) -> bytes:
    for decoder in (_unb64, base64.b64decode):
        try:
            return decoder(text)
        except (binascii.Error, ValueError):
            continue
    return b""


def host_for(request: Request, hosts_by_key: Mapping[str, str]) -> str | None:
    """The registered host whose key signed the server's nonce, if any."""
    if not (request.client_key and request.nonce and request.signature):
        return None
    name = hosts_by_key.get(request.client_key)
    if name is None:
        return None
    proof = _signature_bytes(request.signature)
    if not signed_by(request.client_key, nkeys.PREFIX_BYTE_USER, request.nonce.encode(), proof):
        return None
    return name


def response(request: Request, issuer: nkeys.KeyPair, host: str | None) -> str:
    """The signed answer: a user JWT in the hosts account for `host`, or a refusal."""
    nats: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if host is None:
        nats["error"] = "not a registered host key"
    else:
        user = {
            "sub": request.user_nkey,
            "aud": HOSTS_ACCOUNT,
            "nats": {
                **host_permissions(host),
                "subs": _NO_LIMIT,
                "data": _NO_LIMIT,
                "payload": _NO_LIMIT,
                "type": "user",
                "version": 2,
            },
        }
        nats["jwt"] = encode(user, issuer)
    return encode({"sub": request.user_nkey, "aud": request.server_id, "nats": nats}, issuer)


def answer(token: str, issuer: nkeys.KeyPair, hosts_by_key: Mapping[str, str]) -> tuple[str, str]:
    """(response JWT, host admitted or "") for one authorization request."""
    request = parse_request(token)
    host = host_for(request, hosts_by_key)
    return response(request, issuer, host), host or ""
