"""The operations console (/console, CONTRACT §3): server-rendered pages over the same services
the API uses, signed in with OpenID Connect (authorization code + PKCE)."""
