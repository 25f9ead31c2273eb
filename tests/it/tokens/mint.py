"""Mints JSON Web Tokens for the access-control tests with PyJWT, an implementation
independent of the gateway's. Reads a JSON list of requests on stdin and prints a JSON list
of answers, one per request:

  {"alg": "RS256", "key_file": "rsa.pem", "claims": {...}, "kid": "k1"}  -> signed token
  {"alg": "HS256", "secret": "...", "claims": {...}}                     -> signed token
  {"forge": "hmac_with_file", "alg": "HS256", "key_file": "rsa.pub.pem", "claims": {...}}
        -> an HS256 token whose HMAC key is a public key file's bytes (key confusion),
           built by hand since PyJWT refuses to make one
  {"jwk": "rsa.pub.pem", "kid": "k1", "alg": "RS256"}                    -> a JWK (object)
"""

import base64
import hashlib
import hmac
import json
import sys

import jwt
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def answer(req):
    if "jwk" in req:
        key = serialization.load_pem_public_key(read(req["jwk"]))
        name = type(key).__name__
        if "RSA" in name:
            jwk = json.loads(RSAAlgorithm.to_jwk(key))
        elif "Ed25519" in name:
            jwk = json.loads(OKPAlgorithm.to_jwk(key))
        else:
            jwk = json.loads(ECAlgorithm.to_jwk(key))
        jwk["kid"] = req["kid"]
        if req.get("alg"):
            jwk["alg"] = req["alg"]
        jwk["use"] = "sig"
        return jwk
    headers = {"kid": req["kid"]} if req.get("kid") else None
    if req.get("forge") == "hmac_with_file":
        header = {"alg": req["alg"], "typ": "JWT"}
        signing = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(req["claims"]).encode())
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[req["alg"]]
        signature = hmac.new(read(req["key_file"]), signing.encode(), digest).digest()
        return signing + "." + b64url(signature)
    key = req["secret"] if "secret" in req else read(req["key_file"])
    return jwt.encode(req["claims"], key, algorithm=req["alg"], headers=headers)


print(json.dumps([answer(r) for r in json.load(sys.stdin)]))
