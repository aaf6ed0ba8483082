"""Webhooks: signed, durable, at-least-once delivery to registered endpoints (docs/webhooks.md)."""
