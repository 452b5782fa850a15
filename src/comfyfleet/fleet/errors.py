"""Errors of the worker manager. One root, one subclass per decision a caller must make."""

from __future__ import annotations


class FleetError(Exception):
    """Root of every worker-manager error."""


class FleetConfigError(FleetError):
    """A pool's configuration is invalid; the message says what to fix."""


class FleetClosed(FleetError):
    """The manager (or a provider) was used before ``__aenter__`` or after ``__aexit__``."""


class UnknownWorker(FleetError):
    """No such worker."""


class WorkerStateConflict(FleetError):
    """The worker's state forbids the request (e.g. deleting a static worker)."""


class ProviderError(FleetError):
    """A provider could not do what was asked."""


class ProviderUnavailable(ProviderError):
    """The provider's backend is unreachable, overloaded or rate limiting: try again later."""


class ProviderRejected(ProviderError):
    """The provider refused the request as given (bad image, unknown product, no capacity): retrying the same
    request soon will not help, so starts back off."""


class ProviderNotInstalled(ProviderError):
    """The provider needs an optional extra that is not installed."""
