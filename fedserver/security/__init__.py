"""Coordinator security: certificates (certs), tokens (tokens), the interceptor (auth)."""
