"""The HTTP intake: authenticate, validate, normalize, publish, answer 202."""
