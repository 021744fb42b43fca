"""Identities: certificates (certs), hashed tokens (tokens), bundles (one folder per
identity). The interceptor that checks them is transport/auth.py."""
