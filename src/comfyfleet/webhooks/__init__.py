"""Task webhooks: signed (Standard Webhooks) POSTs of a task when it ends, from a durable outbox."""

from comfyfleet.webhooks.deliverer import (
    DelivererClosed,
    WebhookDeliverer,
    WebhooksError,
    backoff_s,
    signed_headers,
)

__all__ = [
    "DelivererClosed",
    "WebhookDeliverer",
    "WebhooksError",
    "backoff_s",
    "signed_headers",
]
